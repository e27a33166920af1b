"""Lookahead Q-Cache: score with the queries of a few real decode steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sgl_evict.observation import LayerObservation
from sgl_evict.policies.base import LOOKAHEAD, register
from sgl_evict.policies.window import QueryScoringPolicy


@register
@dataclass
class LookaheadQCache(QueryScoringPolicy):
    """LAQ: scores with the queries of a few lookahead decode steps on a provisional SnapKV cache.

    Paper: "Lookahead Q-Cache: Achieving More Consistent KV Eviction via Pseudo Query" (2025).

    Window queries come from the prompt, but eviction serves the decoding queries. LAQ first
    compresses with SnapKV, greedily decodes ``lookahead_steps`` tokens on that provisional cache,
    and uses those decode steps' queries (positions ``seq_len ..``, seeing the whole prompt) to score
    the full cache, which is then compressed for real. The lookahead tokens are discarded.

    Attributes:
        lookahead_steps: decode steps whose queries are captured (the engine runs them).
        include_window: also average in the window queries' scores (both are mean attention, so
            one scale).
        lookahead_tokens: the tokens the lookahead steps decode, teacher-forced, instead of the
            greedy ones (at least ``lookahead_steps``; the first is the answer's first token). To
            compare with a server that decoded its own tokens: on a model whose greedy choices are
            near-ties, a few differing tokens change the lookahead queries.
        reserve: 0, or a factor >= 1: right after prefill only the provisional (SnapKV) cache's best
            ``reserve x budget`` tokens stay candidates, and the lookahead re-score chooses among them.
            The server frees the others before the lookahead steps, so a pending request holds
            ``reserve x budget`` of KV instead of its whole prompt (``--kv-evict-lookahead-reserve``).
    """

    name = "laq"
    needs = ("lookahead_queries", "window_queries")
    query_source = LOOKAHEAD
    #: its provisional keep-set (snapkv's, at prefill) is scored from the window queries as the prefill attended
    one_read = True
    lookahead_steps: int = 8
    include_window: bool = True
    lookahead_tokens: tuple[int, ...] | None = None
    reserve: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lookahead_steps < 1:
            raise ValueError(f"laq needs lookahead_steps >= 1, got {self.lookahead_steps}")
        if self.reserve != 0 and self.reserve < 1:
            raise ValueError(f"laq needs reserve 0 (off) or at least 1, got {self.reserve}")
        if self.lookahead_tokens is not None and len(self.lookahead_tokens) < self.lookahead_steps:
            raise ValueError(f"laq needs at least lookahead_steps={self.lookahead_steps} lookahead_tokens, "
                             f"got {len(self.lookahead_tokens)}")

    def check(self, obs: LayerObservation) -> None:
        obs.require("lookahead_queries", *(("window_queries",) if self.include_window else ()))

    def score(self, obs: LayerObservation) -> torch.Tensor:
        self.check(obs)
        lookahead = self._score(obs, obs.lookahead_queries, None)
        return self.mix(lookahead, self.score_window(obs) if self.include_window else None)

    def mix(self, lookahead: torch.Tensor, window: torch.Tensor | None) -> torch.Tensor:
        """laq's score from its lookahead and window scores (same shapes; both mean attention, so one scale):
        their mean, or the lookahead scores alone without ``include_window``. The harness and the server both
        score through this."""
        if not self.include_window or window is None:
            return lookahead
        return 0.5 * (lookahead + window)
