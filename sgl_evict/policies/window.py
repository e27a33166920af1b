"""Shared hyper-parameters of policies that score by attention of observation queries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sgl_evict.observation import LayerObservation
from sgl_evict.policies.base import WINDOW, EvictionPolicy
from sgl_evict.scoring import score_queries


@dataclass
class QueryScoringPolicy(EvictionPolicy):
    """Base of the pseudo-query policies: attention of some queries, pooled, reduced over GQA groups.

    Attributes:
        pooling_kernel: odd width of the max/avg pooling over neighbouring tokens (1 disables it).
        pooling_mode: ``"max"`` or ``"avg"``.
        gqa_reduce: how a KV head combines its query heads' scores: ``"mean"``, ``"max"`` or ``"sum"``.
        continuation: at selection, each token also takes the best combined score of this many tokens before it,
            so that a kept token's next tokens stay with it (:func:`~sgl_evict.selection.carry_forward`; the
            server's ``--kv-evict-continuation``); 0 is off.
    """

    query_source = WINDOW
    #: False: scores are not pooled over neighbouring tokens, whatever ``pooling_kernel`` says (the server's
    #: ``--kv-evict-pooling-kernel`` then does not apply to this policy either).
    pooled: ClassVar[bool] = True
    #: how many of the prompt's last window queries score (None: the whole observation window).
    window_queries_used: ClassVar[int | None] = None

    pooling_kernel: int = 7
    pooling_mode: str = "max"
    gqa_reduce: str = "mean"
    continuation: int = 0

    def __post_init__(self):
        if isinstance(self.continuation, bool) or not isinstance(self.continuation, int) or self.continuation < 0:
            raise ValueError(f"continuation: expected an integer >= 0, got {self.continuation!r}")

    @property
    def pool_width(self) -> int:
        """The pooling width the scores use: ``pooling_kernel``, or 1 for a policy that does not pool."""
        return self.pooling_kernel if self.pooled else 1

    def used_window(self, window_queries: torch.Tensor) -> torch.Tensor:
        """The scoring part of ``[..., window, ...]`` window queries (or their LSE): the last
        ``window_queries_used`` along dim 1, or all of them."""
        if self.window_queries_used is None:
            return window_queries
        return window_queries[:, -self.window_queries_used:]

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
            pooling_kernel=self.pool_width,
            pooling_mode=self.pooling_mode,
            gqa_reduce=self.gqa_reduce,
            value_weights=value_weights,
            logit_softcap=obs.logit_softcap,
        )

    def score_window(self, obs: LayerObservation) -> torch.Tensor:
        """Scores from the prompt's last-window queries, each seeing only keys up to its own position."""
        queries = self.used_window(obs.window_queries)
        positions = obs.window_positions()[obs.window_queries.shape[1] - queries.shape[1]:]
        return self._score(obs, queries, positions)
