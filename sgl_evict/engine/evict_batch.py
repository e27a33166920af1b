"""Eviction of the requests whose prefill a batch finished: score, select, punch holes, free slots.

laq requests are only marked pending after prefill (their snapkv keep-set hidden, nothing freed) and evicted
after their lookahead decode steps by :func:`evict_after_lookahead`. judgeq requests are scored after the loop over
the batch, all from one extra forward of their soft tokens (:mod:`sgl_evict.engine.judgeq`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from sgl_evict.engine.apply import evict_from_row
from sgl_evict.engine.judgeq import SoftTokenQueries
from sgl_evict.engine.keep import (combined_scores, keep_mask, laprox_scores, lookahead_scores, position_scores,
                                   window_scores)
from sgl_evict.engine.laprox import projected_norms
from sgl_evict.engine.lookahead import PendingLookahead, lookahead_keep_scores
from sgl_evict.engine.runtime import EngineState
from sgl_evict.holes import count_live

logger = logging.getLogger("sgl_evict")


def finishes_prefill(req, batch) -> bool:
    """Whether this batch ran the last prefill chunk of ``req`` (SGLang's ``Req``), which is not done yet."""
    if req.inflight_middle_chunks > 0 or req.is_retracted or req.finished():
        return False
    return not (batch.decoding_reqs and req in batch.decoding_reqs)


def evict_after_prefill(batch, state: EngineState, req_to_token: torch.Tensor, key_buffer: Callable,
                        free: Callable[[torch.Tensor], None], attention_mass: Callable,
                        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, page_size: int = 1,
                        value_buffer: Callable | None = None,
                        soft_token_forward: Callable[[list], SoftTokenQueries | None] | None = None) -> int:
    """Evicts from every request of ``batch`` (SGLang's ``ScheduleBatch``) whose prefill it finished.

    Args:
        state: the process's :class:`EngineState`; its capture must hold this batch's window queries.
        req_to_token: SGLang's ``ReqToTokenPool.req_to_token``.
        key_buffer: layer id -> ``[pool_slots, num_kv_heads, head_dim]`` keys.
        free: hands slots back (``TokenToKVPoolAllocator.free``).
        attention_mass: :func:`sgl_evict.kernels.paged_scoring.attention_mass_paged` (or its signature).
        all_reduce: returns a tensor summed over tensor-parallel ranks (each rank scores its own KV heads, and
            all must keep the same tokens), or None with one rank.
        page_size: the pool's page size; above 1 whole pages are kept or freed.
        value_buffer: layer id -> ``[pool_slots, num_kv_heads, head_dim]`` values (laprox reads them).
        soft_token_forward: judgeq: ``[(batch index, req_to_token row, prompt length)]`` -> the soft tokens'
            queries of those requests (:func:`sgl_evict.engine.judgeq.soft_token_queries` bound to the scheduler),
            or None when the server has no soft-token forward.

    Returns:
        slots freed.
    """
    capture = state.capture
    if capture is None or capture.forward_id != state.forward_id or len(capture.num_queries) != len(batch.reqs):
        return 0
    freed = 0
    judged = []
    for i, req in enumerate(batch.reqs):
        if not finishes_prefill(req, batch):
            continue
        config = state.config_of(req)
        seq_len = int(batch.seq_lens_cpu[i])
        row = req_to_token[req.req_pool_idx, :seq_len]
        if not config.enabled or seq_len < config.min_prompt_len:
            continue
        missing = _missing_model_input(config.policy, state, page_size, soft_token_forward)
        if missing:
            logger.warning("sgl-evict: request %s asks for %s, but %s: its cache is kept in full", req.rid,
                           config.policy, missing)
            continue
        # what the selector keeps at least: the budget, and the sinks and recent tokens it always protects
        recent = max(config.window, state.protected_recent)
        if max(config.budget.num_tokens(seq_len), min(seq_len, config.sinks + recent)) >= count_live(row):
            continue
        if config.policy == "judgeq":
            if seq_len + state.soft_tokens.count > req_to_token.shape[1]:
                logger.warning("sgl-evict: request %s: no room after its prompt for %d soft tokens: its cache is "
                               "kept in full", req.rid, state.soft_tokens.count)
            else:
                judged.append((i, req, config, seq_len))
            continue
        scores = _prefill_scores(config, capture.queries_of(i), capture.scaling, state, row, key_buffer,
                                 value_buffer, attention_mass)
        keep = _keep_of(scores, config, row, page_size, state, all_reduce)
        if config.policy == "laq":
            # the lookahead steps decode on the snapkv view; nothing is dropped before they have run
            # copies: a view would keep the whole batch's window queries alive
            window = {layer: q.clone() for layer, q in capture.queries_of(i).items()}
            state.pending[req.rid] = PendingLookahead(req, seq_len, window, keep, dict(capture.scaling))
            logger.info("sgl-evict: request %s decodes %d lookahead steps on %d of %d tokens (laq)", req.rid,
                        config.lookahead_steps, int(keep.sum()), seq_len)
            continue
        freed += _evict(req, row, keep, state, free)
    if judged:
        freed += _evict_judged(judged, state, req_to_token, key_buffer, free, attention_mass, all_reduce, page_size,
                               soft_token_forward)
    return freed


def _evict_judged(judged: list, state: EngineState, req_to_token: torch.Tensor, key_buffer: Callable,
                  free: Callable, attention_mass: Callable, all_reduce: Callable | None, page_size: int,
                  soft_token_forward: Callable) -> int:
    """Evicts from the judgeq requests ``[(batch index, req, config, prompt length)]`` by their soft tokens'
    queries, all run in one forward; returns slots freed."""
    found = soft_token_forward([(i, req.req_pool_idx, seq_len) for i, req, _, seq_len in judged])
    if found is None:
        return 0
    freed = 0
    for (_, req, config, seq_len), queries in zip(judged, found.queries):
        row = req_to_token[req.req_pool_idx, :seq_len]
        # the soft tokens come after the prompt: each of their queries sees every prompt key, as laq's steps do
        scores = lookahead_scores(queries, found.scaling, key_buffer, row, config.pooling_kernel, attention_mass)
        freed += _evict(req, row, _keep_of(scores, config, row, page_size, state, all_reduce), state, free)
    return freed


def _missing_model_input(policy: str, state: EngineState, page_size: int,
                         soft_token_forward: Callable | None) -> str | None:
    """Why ``policy`` cannot run here (a fact read at start failed, or judgeq without its soft tokens or on a paged
    pool), or None when it can."""
    if policy == "judgeq":
        if state.soft_tokens is None or soft_token_forward is None:
            return "this server loaded no soft-token file (--kv-evict-soft-tokens)"
        if page_size > 1:
            # a paged pool frees whole pages: the temporary slots share the prompt's last page
            return "judgeq runs with --page-size 1 only"
    if policy == "dapq" and state.rope is None:
        return "this model's RoPE could not be read at start"
    if policy == "laprox" and state.value_norm_factors is None:
        return "this model's output projections could not be read at start"
    return None


def _prefill_scores(config, queries: dict, scaling: dict, state: EngineState, row: torch.Tensor,
                    key_buffer: Callable, value_buffer: Callable | None, attention_mass: Callable) -> torch.Tensor:
    """``[num_layers or 1, num_kv_heads or 1, seq_len]`` scores of one request's prompt under ``config.policy``
    (laq: its provisional snapkv scores), from its window ``queries`` (layer id -> ``[num_q_heads, window, d]``)."""
    if config.policy in ("snapkv", "dapq", "laq"):
        return window_scores(queries, scaling, key_buffer, row, config.pooling_kernel, attention_mass,
                             state.rope if config.policy == "dapq" else None)
    if config.policy == "laprox":
        factors = state.value_norm_factors
        return laprox_scores(queries, scaling, key_buffer, row, config.pooling_kernel, attention_mass,
                             lambda layer: projected_norms(value_buffer(layer), row, factors[layer]))
    return position_scores(config.policy, row)


def evict_after_lookahead(batch, state: EngineState, req_to_token: torch.Tensor, key_buffer: Callable,
                          free: Callable[[torch.Tensor], None], attention_mass: Callable,
                          all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, page_size: int = 1) -> int:
    """Evicts from every pending laq request of the decode ``batch`` whose lookahead steps have all run.

    Called after the decode forward and before SGLang processes its result (so a request that finishes in this
    step is released with its holes). Arguments as :func:`evict_after_prefill`. Returns slots freed.
    """
    freed = 0
    for req in batch.reqs:
        entry = state.pending_of(req)
        if entry is None:
            continue
        config = state.config_of(req)
        if entry.decoded < config.lookahead_steps:
            continue
        if len(entry.steps) < entry.decoded:
            logger.warning("sgl-evict: request %s: %d of %d lookahead steps recorded no queries", req.rid,
                           entry.decoded - len(entry.steps), entry.decoded)
        del state.pending[req.rid]
        row = req_to_token[req.req_pool_idx, :entry.prompt_len]
        scores = lookahead_keep_scores(entry, key_buffer, row, config.pooling_kernel, attention_mass)
        freed += _evict(req, row, _keep_of(scores, config, row, page_size, state, all_reduce), state, free)
    return freed


def _keep_of(scores: torch.Tensor, config, row: torch.Tensor, page_size: int, state: EngineState,
             all_reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """``[seq_len]`` bool keep mask of one request from its ``scores [num_layers, num_kv_heads, seq_len]``, their
    combination summed over tensor-parallel ranks first: every rank must keep the same tokens."""
    combined = combined_scores(scores)
    if all_reduce is not None:
        combined = all_reduce(combined)
    return keep_mask(combined, config, row, page_size, state.protected_recent)


def _evict(req, row: torch.Tensor, keep: torch.Tensor, state: EngineState, free: Callable[[torch.Tensor], None]) -> int:
    """Punches ``req``'s dropped tokens into its prompt ``row``, frees the slots it owns, logs; returns slots freed."""
    if os.environ.get("SGL_EVICT_LOG_KEEP") == "1":  # diagnostics: which positions a request kept
        logger.info("sgl-evict: request %s keeps positions %s", req.rid, keep.nonzero().flatten().tolist())
    slots, hidden = evict_from_row(row, keep, owned_from=req.cache_protected_len)
    free(slots)
    state.freed_slots += slots.numel()
    state.hidden_tokens += hidden
    logger.info("sgl-evict: request %s kept %d of %d tokens, freed %d slots, hid %d", req.rid, count_live(row),
                row.shape[0], slots.numel(), hidden)
    return slots.numel()
