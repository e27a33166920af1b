"""laq inside the server: a request decodes its first steps on the snapkv view, then is re-scored and evicted.

After prefill, a laq request's snapkv keep mask only *hides* the dropped prompt tokens (its logical row stays
whole, every slot stays owned): :class:`PendingLookahead` holds the mask, the prompt's window scores and the
decode queries captured so far. Its first ``lookahead_steps`` decode forwards attend over the snapkv view (the
compacted view leaves the hidden positions out) and their queries are recorded. After the last of
them, :func:`lookahead_keep_scores` scores the full prompt with window and lookahead queries, mixed by the
policy's own :meth:`~sgl_evict.policies.laq.LookaheadQCache.mix`, and the request is evicted for real. No
forward beyond the request's own decode steps.

A request that ends before (finished, aborted, retracted) simply keeps its full cache: its row was never changed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from sgl_evict.engine.keep import window_request
from sgl_evict.engine.score_plan import MassFn, ScoreRequest, score_requests
from sgl_evict.policies.laq import LookaheadQCache


@dataclass
class PendingLookahead:
    """One laq request between its prefill and its eviction.

    Attributes:
        req: SGLang's ``Req``.
        prompt_len: logical tokens at prefill end; eviction decides over these, later (answer) tokens are kept.
        window_queries: layer id -> ``[num_q_heads, n, head_dim]`` post-RoPE window queries of the prompt (copies).
            Kept instead of their scores, ``[num_layers, num_kv_heads, prompt_len]`` float32 (33 MB for a 32K prompt
            on Llama-3.1-8B shapes, per pending request): the prompt's keys do not change while it is pending, so
            eviction recomputes the scores from O(window) memory.
        visible: ``[prompt_len]`` bool snapkv keep mask: what the lookahead steps attend to.
        scaling: layer id -> attention logit scale.
        config: the request's config (its ``EvictionConfig``), kept so that its decode steps do not parse its
            override again.
        decoded: decode forwards launched so far on the snapkv view.
        processed: results of those forwards processed so far. Under the overlap scheduler a forward is launched
            before the previous result is processed, so eviction waits for this count, not ``decoded``: the last
            step's queries exist only once its forward ran.
        steps: decode steps whose queries were recorded, each ``(layer id -> [n, num_q_heads, head_dim], row)``:
            the forward's captured queries and this request's row in them.
        hidden: live positions of the prompt the view hides (the compacted view's kept length is counted on the
            host: :mod:`sgl_evict.engine.hole_counts`).
    """

    req: object
    prompt_len: int
    window_queries: dict[int, torch.Tensor]
    visible: torch.Tensor
    scaling: Mapping[int, float]
    config: object = None
    decoded: int = 0
    processed: int = 0
    steps: list[tuple[dict[int, torch.Tensor], int]] = field(default_factory=list)
    hidden: int = 0

    def queries(self) -> dict[int, torch.Tensor]:
        """Layer id -> ``[num_q_heads, steps, head_dim]`` lookahead queries (empty if none were recorded)."""
        if not self.steps:
            return {}
        layers = self.steps[0][0].keys()
        return {layer: torch.stack([taken[layer][row] for taken, row in self.steps], dim=1) for layer in layers}


def pending_positions(rids: list[str] | None, pending: Mapping[str, PendingLookahead]) -> list[int]:
    """Batch positions (``ForwardBatch.rids`` order) of the requests that are pending."""
    if not rids or not pending:
        return []
    return [i for i, rid in enumerate(rids) if rid in pending]


def record_step(rids: list[str], positions: list[int], taken: dict[int, torch.Tensor],
                pending: Mapping[str, PendingLookahead]) -> None:
    """Counts one decode forward for the pending requests at ``positions`` and appends its queries ``taken``
    (rows in ``positions`` order; empty when the forward recorded none)."""
    for row, position in enumerate(positions):
        entry = pending[rids[position]]
        entry.decoded += 1
        if taken:
            entry.steps.append((taken, row))


def lookahead_requests(entry: PendingLookahead, row: torch.Tensor, pooling_kernel: int) -> list[ScoreRequest]:
    """What laq scores of one pending request: its prompt's window queries (causal) and, when any were recorded, its
    lookahead queries (after the prompt), both over the ``[prompt_len]`` logical slot ``row`` of the prompt."""
    requests = [window_request(entry.window_queries, row, pooling_kernel)]
    queries = entry.queries()
    if queries:
        requests.append(ScoreRequest(row, queries, causal=False, pooling_kernel=pooling_kernel))
    return requests


def mixed_scores(scores: list[torch.Tensor], policy: LookaheadQCache | None = None) -> torch.Tensor:
    """laq's scores from :func:`lookahead_requests`' scored ``[window, ahead]`` (or ``[window]`` alone: the snapkv
    keep-set the request already decoded with), mixed by ``policy.mix`` (None: its defaults)."""
    if len(scores) == 1:
        return scores[0]
    window, ahead = scores
    return (policy or LookaheadQCache()).mix(ahead, window)


def lookahead_keep_scores(entry: PendingLookahead, key_buffer: Callable[[int], torch.Tensor], row: torch.Tensor,
                          pooling_kernel: int, attention_mass: MassFn,
                          policy: LookaheadQCache | None = None) -> torch.Tensor:
    """laq's ``[num_layers, num_kv_heads, prompt_len]`` scores of one pending request: lookahead and window scores
    per layer, mixed by ``policy.mix`` (the request's :class:`LookaheadQCache`; None: its defaults).

    ``row`` is the ``[prompt_len]`` logical slot row of the prompt. Without recorded queries (a decode forward
    that captured nothing), the window scores alone: the snapkv keep-set the request already decoded with.
    """
    requests = lookahead_requests(entry, row, pooling_kernel)
    return mixed_scores(score_requests(requests, entry.scaling, key_buffer, attention_mass), policy)
