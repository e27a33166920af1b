"""Shared hyper-parameters of policies that score by attention of observation queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sgl_evict.observation import LayerObservation
from sgl_evict.policies.base import EvictionPolicy
from sgl_evict.scoring import score_queries


@dataclass
class QueryScoringPolicy(EvictionPolicy):
    """Base of the pseudo-query policies: attention of some queries, pooled, reduced over GQA groups.

    Attributes:
        pooling_kernel: odd width of the max/avg pooling over neighbouring tokens (1 disables it).
        pooling_mode: ``"max"`` or ``"avg"``.
        gqa_reduce: how a KV head combines its query heads' scores: ``"mean"``, ``"max"`` or ``"sum"``.
    """

    pooling_kernel: int = 7
    pooling_mode: str = "max"
    gqa_reduce: str = "mean"

    def _score(
        self,
        obs: LayerObservation,
        queries: torch.Tensor,
        query_positions: torch.Tensor | None,
        value_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return score_queries(
            queries,
            obs.keys,
            obs.scaling,
            query_positions=query_positions,
            pooling_kernel=self.pooling_kernel,
            pooling_mode=self.pooling_mode,
            gqa_reduce=self.gqa_reduce,
            value_weights=value_weights,
            logit_softcap=obs.logit_softcap,
        )

    def score_window(self, obs: LayerObservation) -> torch.Tensor:
        """Scores from the prompt's last-window queries, each seeing only keys up to its own position."""
        return self._score(obs, obs.window_queries, obs.window_positions())
