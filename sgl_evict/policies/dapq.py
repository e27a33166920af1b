"""Position-aware pseudo-queries: window queries moved to where the answer will be."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sgl_evict.observation import LayerObservation
from sgl_evict.policies.base import REROTATED_WINDOW, register
from sgl_evict.policies.window import QueryScoringPolicy
from sgl_evict.rope import rerotate


@register
@dataclass
class PositionAwarePseudoQueries(QueryScoringPolicy):
    """DAPQ: position-aware pseudo-queries.

    A window query carries the content of the prompt's end but the RoPE phase of its own position,
    so it favours keys at the distances it sees from there. Decoding queries sit after the prompt.
    DAPQ takes each window query back to its pre-RoPE form and rotates it to the position the
    answer's ``i``-th token will occupy (``seq_len + offset + i``), then scores every prompt key
    with these pseudo-queries (no causal mask: they are all after the prompt). RoPE parameters come
    from the model config (``RopeSpec.from_config``), scaled variants included.

    Attributes:
        offset: distance of the first pseudo-query position past the prompt's end (0: the next token).
    """

    name = "dapq"
    needs = ("window_queries", "rope")
    query_source = REROTATED_WINDOW
    offset: int = 0

    def pseudo_queries(self, obs: LayerObservation) -> torch.Tensor:
        """``[num_q_heads, window, head_dim]`` window queries re-rotated to ``seq_len + offset + i``."""
        source = obs.window_positions()
        target = torch.arange(source.numel(), device=source.device) + obs.seq_len + self.offset
        return rerotate(obs.window_queries.float(), source, target, obs.rope)

    def score(self, obs: LayerObservation) -> torch.Tensor:
        self.check(obs)
        return self._score(obs, self.pseudo_queries(obs), None)
