"""Cheap baselines: keep everything, keep sinks + recent, keep at random."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sgl_evict.observation import LayerObservation
from sgl_evict.policies.base import EvictionPolicy, register


@register
@dataclass
class NoEviction(EvictionPolicy):
    """Keeps the full cache; the engine skips capture and selection. Scores are all ones."""

    name = "none"
    compresses = False

    def score(self, obs: LayerObservation) -> torch.Tensor:
        return torch.ones(obs.num_kv_heads, obs.seq_len, dtype=torch.float32, device=obs.keys.device)


@register
@dataclass
class StreamingLLM(EvictionPolicy):
    """StreamingLLM: keeps the attention sinks and the most recent tokens.

    Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (2023).
    Keeps the attention sinks and the most recent tokens: the score is the token's position, so the
    budget left after the protected sinks goes to the latest tokens.
    """

    name = "streaming"

    def score(self, obs: LayerObservation) -> torch.Tensor:
        pos = torch.arange(obs.seq_len, dtype=torch.float32, device=obs.keys.device)
        return pos.expand(obs.num_kv_heads, -1).clone()

    def score_positions(self, seq_len: int) -> torch.Tensor:
        # + 1: the engine zeroes holes, and the first token must still outrank them
        return torch.arange(seq_len, dtype=torch.float32) + 1.0


@register
@dataclass
class RandomEviction(EvictionPolicy):
    """Keeps a seeded random subset (plus the protected tokens): the floor any policy must beat."""

    name = "random"
    seed: int = 0

    def score(self, obs: LayerObservation) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.rand(obs.num_kv_heads, obs.seq_len, generator=gen).to(obs.keys.device)

    def score_positions(self, seq_len: int) -> torch.Tensor:
        return torch.rand(seq_len, generator=torch.Generator().manual_seed(self.seed))
