"""SnapKV: the prompt's last window of queries votes for the keys it attends."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sgl_evict.observation import LayerObservation
from sgl_evict.policies.base import register
from sgl_evict.policies.window import QueryScoringPolicy


@register
@dataclass
class SnapKV(QueryScoringPolicy):
    """SnapKV: the prompt's last window of queries votes for the keys it attends.

    Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (2024).
    The last ``window`` prompt tokens act as observation queries: each key's score is the mean
    attention they pay it (causally), smoothed by max pooling so that neighbouring tokens of an
    important span survive together. The window itself is protected by the selector (``recent``).
    The window length is set where queries are captured (the engine's ``window`` option); the
    scoring math does not depend on it.
    """

    name = "snapkv"
    needs = ("window_queries",)
    one_read = True

    def score(self, obs: LayerObservation) -> torch.Tensor:
        self.check(obs)
        return self.score_window(obs)
