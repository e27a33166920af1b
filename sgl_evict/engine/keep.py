"""A request's keep mask after prefill: policy scores from the paged key pool, then the shared selector."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping

import torch

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.score_plan import MassFn, ScoreRequest, score_requests
from sgl_evict.env import env_setting
from sgl_evict.holes import is_live
from sgl_evict.kernels.selection import select_pages
from sgl_evict.policies import EvictionPolicy, make_policy
from sgl_evict.rope import RopeSpec
from sgl_evict.selection import Budget, carry_forward, select_keep

logger = logging.getLogger("sgl_evict")

def window_scores(
    window_queries: Mapping[int, torch.Tensor],
    scaling: Mapping[int, float],
    key_buffer: Callable[[int], torch.Tensor],
    row: torch.Tensor,
    pooling_kernel: int,
    attention_mass: MassFn,
    rope: RopeSpec | None = None,
    row_of: Callable[[int], torch.Tensor] | None = None,
    row_lse: Mapping[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """SnapKV (or, with ``rope``, DAPQ) scores of one request from its window queries, keys read from the pool.

    Args:
        window_queries: layer id -> ``[num_q_heads, window, head_dim]`` post-RoPE queries of the prompt's last
            ``window`` tokens (positions ``seq_len - window .. seq_len - 1``).
        scaling: layer id -> attention logit scale.
        key_buffer: layer id -> ``[pool_slots, num_kv_heads, head_dim]`` that layer's keys.
        row: ``[seq_len]`` int32 logical slot row of the request (``HOLE`` for evicted tokens).
        pooling_kernel: odd max-pooling width over neighbouring tokens.
        attention_mass: :func:`sgl_evict.kernels.paged_scoring.attention_mass_paged` or a stand-in with its
            signature (holes must get zero mass and stay out of the softmax).
        rope: DAPQ: the model's RoPE; each window query is re-rotated to the position the answer's ``i``-th token
            will take (``seq_len + i``) and sees every prompt key (``sgl_evict.policies.dapq``). None: SnapKV,
            queries at their own positions, causal.
        row_of: layered pool (issue 9): layer id -> ``[seq_len]`` the slots of ``row`` in that layer's buffer
            (its group-slots, ``HOLE`` where the group dropped the token); None: ``row`` for every layer.
        row_lse: layer id -> ``[num_q_heads, window]`` natural log-sum-exp of each window query over the live keys
            of ``row`` up to its position, with ``scaling`` (the prefill attention's, ``WindowQueryCapture.lse_of``):
            those layers read their keys once. Not with ``rope``: re-rotated queries have other logits.

    Returns:
        ``[num_layers, num_kv_heads, seq_len]`` float32, zero at holes.
    """
    request = window_request(window_queries, row, pooling_kernel, rope, row_of=row_of, row_lse=row_lse)
    return score_requests([request], scaling, key_buffer, attention_mass, one_read_check())[0]


def window_request(window_queries: Mapping[int, torch.Tensor], row: torch.Tensor, pooling_kernel: int,
                   rope: RopeSpec | None = None, value_norms: Callable[[int], torch.Tensor] | None = None,
                   row_of: Callable[[int], torch.Tensor] | None = None,
                   row_lse: Mapping[int, torch.Tensor] | None = None) -> ScoreRequest:
    """The :class:`~sgl_evict.engine.score_plan.ScoreRequest` of one request scored from its prompt's window
    queries: snapkv (causal), dapq (``rope``: re-rotated after the prompt) or laprox (``value_norms``); arguments
    as :func:`window_scores` and :func:`laprox_scores`."""
    if rope is not None and row_lse:
        raise ValueError("dapq's re-rotated queries are not the prefill's: their window LSE does not apply")
    return ScoreRequest(row, window_queries, causal=rope is None, pooling_kernel=pooling_kernel,
                        lse=dict(row_lse or {}), rope=rope, value_norms=value_norms, row_of=row_of)


def lookahead_scores(
    lookahead_queries: Mapping[int, torch.Tensor],
    scaling: Mapping[int, float],
    key_buffer: Callable[[int], torch.Tensor],
    row: torch.Tensor,
    pooling_kernel: int,
    attention_mass: MassFn,
) -> torch.Tensor:
    """Scores of one request from queries that come after its prompt: LAQ's first decode steps, or Judge Q's soft
    tokens (``sgl_evict.policies.judgeq``), against its whole prompt.

    Args:
        lookahead_queries: layer id -> ``[num_q_heads, steps, head_dim]`` post-RoPE queries of the decode steps or
            soft tokens (positions ``seq_len ..``, after the prompt: each sees every prompt key, as in
            ``sgl_evict.policies.laq`` and ``sgl_evict.policies.judgeq``).
        row: ``[seq_len]`` int32 logical slot row of the prompt only (the softmax runs over the prompt's keys, as
            the harness scores the prompt cache).
        scaling, key_buffer, pooling_kernel, attention_mass: as in :func:`window_scores`.

    Returns:
        ``[num_layers, num_kv_heads, seq_len]`` float32, zero at holes.
    """
    request = ScoreRequest(row, lookahead_queries, causal=False, pooling_kernel=pooling_kernel)
    return score_requests([request], scaling, key_buffer, attention_mass)[0]


def laprox_scores(
    window_queries: Mapping[int, torch.Tensor],
    scaling: Mapping[int, float],
    key_buffer: Callable[[int], torch.Tensor],
    row: torch.Tensor,
    pooling_kernel: int,
    attention_mass: MassFn,
    value_norms: Callable[[int], torch.Tensor],
    row_of: Callable[[int], torch.Tensor] | None = None,
    row_lse: Mapping[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """laprox scores of one request (``sgl_evict.policies.laprox``): each query head's causal window attention
    times ``|| W_o^h v_t ||``, pooled, summed over each GQA group (the policy's ``gqa_reduce``).

    Args:
        value_norms: layer id -> ``[num_q_heads, seq_len]`` projected value norms of the request's prompt
            (:func:`sgl_evict.engine.laprox.projected_norms`).
        window_queries, scaling, key_buffer, row, pooling_kernel, attention_mass, row_of, row_lse: as in
            :func:`window_scores`.

    Returns:
        ``[num_layers, num_kv_heads, seq_len]`` float32, zero at holes.
    """
    request = window_request(window_queries, row, pooling_kernel, value_norms=value_norms, row_of=row_of,
                             row_lse=row_lse)
    return score_requests([request], scaling, key_buffer, attention_mass, one_read_check())[0]


#: off while the warm-up scores with a placeholder LSE (its one-read scores are meant to be wrong)
_CHECK_ONE_READ = contextvars.ContextVar("sgl_evict_check_one_read", default=True)


def one_read_check() -> Callable[[int, torch.Tensor, torch.Tensor], float] | None:
    """:func:`check_one_read` when ``SGL_EVICT_CHECK_LSE=1`` asks for it (and no :func:`one_read_check_off` block
    is running), else None: what :func:`~sgl_evict.engine.score_plan.score_requests` takes."""
    return check_one_read if env_setting("SGL_EVICT_CHECK_LSE") == "1" and _CHECK_ONE_READ.get() else None


@contextlib.contextmanager
def one_read_check_off() -> Iterator[None]:
    """Within this block ``SGL_EVICT_CHECK_LSE=1`` does not compare one-read scores with two-pass ones: for
    callers whose ``row_lse`` is a placeholder (the kernel warm-up), where the comparison would only report it."""
    token = _CHECK_ONE_READ.set(False)
    try:
        yield
    finally:
        _CHECK_ONE_READ.reset(token)


def check_one_read(layer: int, one_read: torch.Tensor, two_pass: torch.Tensor, tolerance: float = 1e-2) -> float:
    """Debug check (``SGL_EVICT_CHECK_LSE=1``): the ``[num_q_heads, seq_len]`` attention mass of one layer scored in
    one read (with the captured LSE) against two passes (the kernel's own normaliser). A wrong LSE scales each
    query's row by ``exp(true - given)``: it shows in the largest difference (relative to the largest mass) and in
    each head's total mass (1 in two passes: the mean of rows that sum to 1). Logs both, as a warning when either
    is above ``tolerance``; returns the larger."""
    largest = float((one_read - two_pass).abs().max() / two_pass.abs().max().clamp_min(1e-30))
    totals = float((one_read.sum(-1) / two_pass.sum(-1).clamp_min(1e-30) - 1).abs().max())
    log = logger.warning if max(largest, totals) > tolerance else logger.info
    log("sgl-evict: one-read check: layer %d, max difference %.2e of the largest mass, head totals off by %.2e",
        layer, largest, totals)
    return max(largest, totals)


def position_scores(policy: EvictionPolicy | str, row: torch.Tensor) -> torch.Tensor:
    """Scores of a query-free policy (a policy object or a registered name), ``[1, 1, seq_len]`` float32, zero at
    holes: its :meth:`~sgl_evict.policies.base.EvictionPolicy.score_positions`."""
    policy = make_policy(policy) if isinstance(policy, str) else policy
    seq_len = row.shape[0]
    scores = policy.score_positions(seq_len).to(row.device)
    return (scores * is_live(row).float()).view(1, 1, seq_len)


def combined_scores(scores: torch.Tensor) -> torch.Tensor:
    """``[num_layers, num_kv_heads, seq_len]`` -> ``[seq_len]``: each (layer, head) row normalised, then summed.

    The ``uniform`` combination of ``sgl_evict.selection.select_keep`` (a sum where it takes a mean: the same
    ranking), written as a sum so that tensor-parallel ranks, each holding some KV heads, can all-reduce it: a
    row depends only on its own KV head's query heads (for laprox also on their own columns of ``W_o``, which the
    rank holds), so the sum over ranks of these sums is the sum over all rows. This holds while every rank holds
    whole KV heads with their whole query groups (``tp_size <= num_kv_heads``); with replicated KV heads each rank
    would normalise a part of a group.
    """
    total = scores.sum(dim=-1, keepdim=True)
    return (scores / torch.where(total > 0, total, torch.ones_like(total))).sum(dim=(0, 1))


def keep_mask(combined: torch.Tensor, config: EvictionConfig, row: torch.Tensor, page_size: int = 1,
              protected_recent: int = 0, prefix: int = 0) -> torch.Tensor:
    """``[seq_len]`` bool keep mask of one request from its :func:`combined_scores`: one keep-set for all layers
    and heads (``uniform``). The budget counts the request's logical tokens; the first ``sinks`` and last
    ``max(window, protected_recent)`` tokens are always kept, as in the HF harness (its ``protected_recent``).
    ``protected_recent``: the model's sliding window (:attr:`EngineState.protected_recent`). ``prefix``: the
    leading tokens the request found in the radix cache (``req.cache_protected_len``), which ``history`` ``keep``
    keeps as cached (:func:`_keep_after_prefix`).

    ``config.continuation`` (query-scoring policies): live tokens also take the best score of that many tokens
    before them (:func:`~sgl_evict.selection.carry_forward`; holes keep their zero).

    With ``page_size > 1`` whole pages are kept or dropped (a page's score is the sum of its tokens', the budget
    is rounded up to pages; ``kernels/selection.py``), so every dropped page can be freed. ``row`` is the
    request's ``[seq_len]`` slot row (its pages).
    """
    if config.history == "keep" and prefix > 0:
        return _keep_after_prefix(combined, config, row, page_size, protected_recent, prefix)
    combined = carry_forward(combined, config.continuation, is_live(row))
    seq_len = combined.shape[0]
    recent = max(config.window, protected_recent)
    if page_size == 1:
        kept = select_keep(combined.view(1, 1, -1), config.budget, config.sinks, recent, "uniform")
        return kept.mask(0)[0]
    budget = torch.tensor([config.budget.num_tokens(seq_len)], device=row.device)
    lens = torch.tensor([seq_len], dtype=torch.int32, device=row.device)
    selection = select_pages(combined.view(1, -1), row.view(1, -1), lens, budget, page_size, config.sinks, recent)
    return selection.keep_mask[0]


def _keep_after_prefix(combined: torch.Tensor, config: EvictionConfig, row: torch.Tensor, page_size: int,
                       protected_recent: int, prefix: int) -> torch.Tensor:
    """``history`` ``keep``: the cached prefix (rounded down to whole pages) keeps exactly its live tokens, the
    radix cache's holes stay holes, and the new tokens after it are selected as a prompt of their own: a fraction
    budget of their count (a token budget less what the prefix holds), the last tokens protected as usual.

    Rescoring the prefix instead hides tokens the radix cache still holds (they are not the request's to free), so
    it saves no memory; measured on Gemma 3 270M in docs/quality.md."""
    start = prefix - prefix % page_size
    keep = torch.zeros(combined.shape[0], dtype=torch.bool, device=combined.device)
    keep[:start] = is_live(row[:start])
    if start >= combined.shape[0]:
        return keep
    budget = config.budget
    if budget.tokens is not None:
        budget = Budget(tokens=max(1, budget.tokens - int(keep.sum())))
    suffix = dataclasses.replace(config, budget=budget, sinks=max(0, config.sinks - start), history="rescore")
    keep[start:] = keep_mask(combined[start:], suffix, row[start:], page_size, protected_recent)
    return keep
