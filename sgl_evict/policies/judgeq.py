"""Judge Q: learned soft tokens whose queries judge the cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sgl_evict.observation import LayerObservation
from sgl_evict.policies.base import SOFT_TOKENS, register
from sgl_evict.policies.window import QueryScoringPolicy
from sgl_evict.soft_tokens import SoftTokens


@register
@dataclass
class JudgeQ(QueryScoringPolicy):
    """Judge Q: soft-token queries trained to attend like the decoding queries do.

    ``k`` learned embedding vectors are appended after the prompt; the queries they produce in each
    layer score every prompt key (no causal mask: they come after it). Their own KV is used for
    nothing else and never kept. The vectors are trained per model (``sgl-evict train-judgeq``) and
    loaded from a safetensors file whose model fingerprint must match.

    Attributes:
        soft_tokens_path: safetensors file written by :meth:`SoftTokens.save`; the engine loads it
            (checking the fingerprint) and runs the soft tokens to produce ``soft_token_queries``.
    """

    name = "judgeq"
    needs = ("soft_token_queries",)
    query_source = SOFT_TOKENS
    soft_tokens_path: str | None = None
    soft_tokens: SoftTokens | None = field(default=None, repr=False)

    def load(self, model_fingerprint: str) -> SoftTokens:
        """Loads (once) the soft tokens for the model with this fingerprint."""
        if self.soft_tokens is None:
            if not self.soft_tokens_path:
                raise ValueError("policy 'judgeq' needs a soft-token file (soft_tokens_path)")
            self.soft_tokens = SoftTokens.load(self.soft_tokens_path, expect_fingerprint=model_fingerprint)
        return self.soft_tokens

    def score(self, obs: LayerObservation) -> torch.Tensor:
        self.check(obs)
        return self._score(obs, obs.soft_token_queries, None)
