"""Eviction of the requests whose prefill a batch finished: score, select, punch holes, free slots.

Each request's policy object (``config.policy_object``) says how it is scored: its query source, its value
weighting, whether it can score in one read. Lookahead policies (laq) are only marked pending after prefill (their
snapkv keep-set hidden, nothing freed) and evicted after their lookahead decode steps by
:func:`evict_after_lookahead`. Soft-token policies (judgeq) are scored after the loop over the batch, all from one
extra forward of their soft tokens (:mod:`sgl_evict.engine.judgeq`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

from sgl_evict.engine.apply import evict_from_row
from sgl_evict.engine.group_evict import evict_groups
from sgl_evict.engine.group_keep import layout_group_scores, layout_keep_masks
from sgl_evict.engine.judgeq import SoftTokenQueries
from sgl_evict.engine.keep import combined_scores, keep_mask, one_read_check, position_scores, window_request
from sgl_evict.engine.laprox import projected_norms
from sgl_evict.engine.lookahead import PendingLookahead, lookahead_requests, mixed_scores
from sgl_evict.engine.last_token import evict_at, forget_cut
from sgl_evict.engine.restore import RestoreCandidates, restore_candidates, restore_keep, restore_scores, restore_tokens
from sgl_evict.engine.runtime import EngineState
from sgl_evict.engine.score_plan import ScoreRequest, score_requests
from sgl_evict.env import env_setting
from sgl_evict.holes import HOLE, count_live, is_live
from sgl_evict.layer_groups import GroupLayout
from sgl_evict.policies import EvictionPolicy
from sgl_evict.policies.base import LOOKAHEAD, POSITIONS, REROTATED_WINDOW, SOFT_TOKENS, WINDOW

logger = logging.getLogger("sgl_evict")


def finishes_prefill(req, batch) -> bool:
    """Whether this batch ran the last prefill chunk of ``req`` (SGLang's ``Req``), which is not done yet."""
    if req.inflight_middle_chunks > 0 or req.is_retracted or req.finished():
        return False
    return not (batch.decoding_reqs and req in batch.decoding_reqs)


def evicts_now(req, batch, index: int) -> bool:
    """Whether processing this batch's result evicts from ``req`` (``batch.reqs[index]``): its last prefill chunk
    ran, or, when that chunk was cut one token short (:mod:`sgl_evict.engine.last_token`), the cut one did."""
    at = evict_at(req)
    if at is None:
        return finishes_prefill(req, batch)
    return int(batch.seq_lens_cpu[index]) == at and not req.is_retracted and not req.finished()


def evict_after_prefill(batch, state: EngineState, req_to_token: torch.Tensor, key_buffer: Callable,
                        free: Callable[[torch.Tensor], None], attention_mass: Callable,
                        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, page_size: int = 1,
                        value_buffer: Callable | None = None,
                        soft_token_forward: Callable[[list], SoftTokenQueries | None] | None = None,
                        layered=None, reversible=None) -> int:
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
        layered: ``--kv-evict-granularity per_layer``: the server's
            :class:`~sgl_evict.engine.layered_allocator.LayeredTokenToKVPoolAllocator` (its pool is the
            ``LayeredMHATokenToKVPool`` that ``key_buffer`` / ``value_buffer`` read); every request then keeps one
            keep-set per layer group (:func:`_evict_per_layer`). None: one keep-set for all layers.
        reversible: ``--kv-evict-host-pool-gb``: the server's
            :class:`~sgl_evict.engine.reversible_radix_cache.ReversibleRadixCache`. A request with ``history``
            ``restore`` then copies its evicted tokens to host memory, and one whose matched prefix has copies
            rescores every token and brings the kept ones back (:func:`_evict_restoring`). None: no host copies.

    Returns:
        slots freed (with ``layered``: group-slots).
    """
    capture = state.capture
    if capture is None or capture.forward_id != state.forward_id or len(capture.num_queries) != len(batch.reqs):
        return 0
    freed = 0
    judged = []
    scored: list[PromptToScore] = []
    to_restore: list[PromptToScore] = []
    modes = ScoringModes()
    for i, req in enumerate(batch.reqs):
        at = evict_at(req)
        if at is not None and int(batch.seq_lens_cpu[i]) > at:
            forget_cut(req)  # the last token's own chunk, after a cut: evicted already
            continue
        if not evicts_now(req, batch, i):
            continue
        config = state.config_of(req)
        seq_len = int(batch.seq_lens_cpu[i])
        row = req_to_token[req.req_pool_idx, :seq_len]
        if not config.enabled or seq_len < config.min_prompt_len:
            continue
        policy = config.policy_object
        missing = _missing_model_input(policy, state, page_size, soft_token_forward)
        if missing:
            logger.warning("sgl-evict: request %s asks for %s, but %s: its cache is kept in full", req.rid,
                           config.policy, missing)
            continue
        restoring = reversible is not None and config.history == "restore"
        candidates = restore_candidates(reversible, req, row) if restoring else None
        # what the selector keeps at least: the budget, and the sinks and recent tokens it always protects
        recent = max(config.window, state.protected_recent)
        live = count_live(row) if candidates is None else candidates.count
        if max(config.budget.num_tokens(seq_len), min(seq_len, config.sinks + recent)) >= live:
            if candidates is not None:  # every held-out token fits: all come back
                state.restored_tokens += restore_tokens(reversible, req, row, *_backed(candidates))
            continue
        if policy.query_source == SOFT_TOKENS:
            if seq_len + state.soft_tokens.count > req_to_token.shape[1]:
                logger.warning("sgl-evict: request %s: no room after its prompt for %d soft tokens: its cache is "
                               "kept in full", req.rid, state.soft_tokens.count)
            else:
                judged.append((i, req, config, seq_len))
            continue
        if layered is not None:
            modes.add(policy, {}, "per_layer pool (scored through each group's slots)")
            scored.append(PromptToScore(req, config, row, capture.queries_of(i), {}, layer_rows(layered, row)))
            continue
        if candidates is not None:
            modes.add(policy, {}, "restoring from host memory (every logical token rescored)")
            to_restore.append(PromptToScore(req, config, row, capture.queries_of(i), {},
                                            offload=reversible.offload, candidates=candidates))
            continue
        row_lse, why = _window_lse(capture, i, policy, live)
        modes.add(policy, row_lse, why)
        scored.append(PromptToScore(req, config, row, capture.queries_of(i), row_lse,
                                    offload=reversible.offload if restoring else None))
    # every request's scores at once: one kernel launch per layer for the requests that share its constants
    all_scores = prefill_scores(scored, capture.scaling, state, key_buffer, value_buffer, attention_mass)
    for entry, scores in zip(scored, all_scores):
        if layered is not None:
            freed += _evict_per_layer(entry, scores, state, all_reduce, layered)
        else:
            freed += _evict_scored(entry, scores, state, free, all_reduce, page_size, capture.scaling)
    for entry in to_restore:
        freed += _evict_restoring(entry, state, free, reversible, key_buffer, attention_mass, capture.scaling,
                                  value_buffer)
    if judged:
        freed += _evict_judged(judged, state, req_to_token, key_buffer, free, attention_mass, all_reduce, page_size,
                               soft_token_forward)
    modes.log()
    return freed


@dataclasses.dataclass
class PromptToScore:
    """A request of the batch scored from its prompt: its window queries (layer id -> ``[num_q_heads, n, d]``),
    the window LSE it may read its keys once with, (layered pool) its slots in each layer's buffer, and (host pool)
    where its evicted tokens go and which held-out tokens it may bring back."""

    req: object
    config: object
    row: torch.Tensor
    queries: dict[int, torch.Tensor]
    row_lse: dict[int, torch.Tensor]
    row_of: Callable[[int], torch.Tensor] | None = None
    #: history ``restore``: copies dropped own tokens to host memory before their slots are freed
    offload: Callable | None = None
    #: history ``restore`` on a prefix with host copies: every logical token this request scores
    candidates: RestoreCandidates | None = None


def _evict_scored(entry: PromptToScore, scores: torch.Tensor, state: EngineState, free: Callable,
                  all_reduce: Callable | None, page_size: int, scaling: dict) -> int:
    """Keeps ``entry``'s best tokens by its ``scores`` and frees the rest; laq: marks it pending instead (its
    lookahead steps decode on the snapkv view first). Returns slots freed."""
    req, config, row = entry.req, entry.config, entry.row
    combined = _rank_combined(scores, all_reduce)
    keep = keep_mask(combined, config, row, page_size, state.protected_recent, req.cache_protected_len)
    if config.policy_object.query_source != LOOKAHEAD:
        return _evict(req, row, keep, state, free, entry.offload, combined)
    # the lookahead steps decode on the snapkv view; before they have run, only what falls outside the reserve
    # (the provisional best reserve x budget, when one is set) is dropped
    freed = 0
    if config.lookahead_reserve:
        reserve = dataclasses.replace(config, budget=config.budget.scaled(config.lookahead_reserve))
        wide = keep_mask(combined, reserve, row, page_size, state.protected_recent, req.cache_protected_len)
        if not bool(wide.all()):  # a reserve as large as the prompt drops nothing
            freed += _evict(req, row, wide, state, free)
            keep = keep & wide
    # copies: a view would keep the whole batch's window queries alive
    window = {layer: q.clone() for layer, q in entry.queries.items()}
    hidden = int((is_live(row) & ~keep).sum())
    state.pending[req.rid] = PendingLookahead(req, row.shape[0], window, keep, dict(scaling), config, hidden=hidden)
    if env_setting("SGL_EVICT_LOG_KEEP") == "1":  # diagnostics: what the lookahead steps attend to
        logger.info("sgl-evict: request %s looks ahead on positions %s", req.rid, keep.nonzero().flatten().tolist())
    logger.info("sgl-evict: request %s decodes %d lookahead steps on %d of %d tokens (laq)", req.rid,
                config.lookahead_steps, int(keep.sum()), row.shape[0])
    return freed


def _window_lse(capture, index: int, policy: EvictionPolicy,
                live: int) -> tuple[dict[int, torch.Tensor], str | None]:
    """Layer id -> ``[num_q_heads, n]`` natural LSE of the ``index``-th request's window queries that the scorer may
    use (:meth:`~sgl_evict.engine.capture.WindowQueryCapture.lse_of`), and why some or all layers have none.

    Only a ``one_read`` policy scores the prompt's window queries, causal, over the request's live keys: exactly
    what the prefill attention normalised those queries over (dapq re-rotates them first: other logits)."""
    if not policy.one_read:
        return {}, f"{policy.name} does not score the window queries as the prefill attended them"
    return capture.lse_of(index, live)


class ScoringModes:
    """How the requests of one prefill batch were scored from queries, for one log line per batch: ``one-read``
    (every layer given the prefill's window LSE), ``mixed`` (some layers) or ``two-pass`` (none), with the reasons."""

    def __init__(self):
        self.counts = {"one-read": 0, "mixed": 0, "two-pass": 0}
        self.reasons: dict[str, int] = {}

    def add(self, policy: EvictionPolicy, row_lse: dict, why: str | None) -> None:
        if policy.query_source not in (WINDOW, REROTATED_WINDOW, LOOKAHEAD):
            return  # scored from positions, or from soft tokens' queries, never from the prefill's window LSE
        mode = "one-read" if row_lse and why is None else "mixed" if row_lse else "two-pass"
        self.counts[mode] += 1
        if why is not None:
            self.reasons[why] = self.reasons.get(why, 0) + 1

    def log(self) -> None:
        if not any(self.counts.values()):
            return
        why = "".join(f"; {reason} (x{n})" for reason, n in self.reasons.items())
        logger.info("sgl-evict: scoring after prefill: %d one-read, %d mixed, %d two-pass%s",
                    self.counts["one-read"], self.counts["mixed"], self.counts["two-pass"], why)


def _evict_judged(judged: list, state: EngineState, req_to_token: torch.Tensor, key_buffer: Callable,
                  free: Callable, attention_mass: Callable, all_reduce: Callable | None, page_size: int,
                  soft_token_forward: Callable) -> int:
    """Evicts from the judgeq requests ``[(batch index, req, config, prompt length)]`` by their soft tokens'
    queries, all run in one forward; returns slots freed."""
    found = soft_token_forward([(i, req.req_pool_idx, seq_len) for i, req, _, seq_len in judged])
    if found is None:
        return 0
    rows = [req_to_token[req.req_pool_idx, :seq_len] for _, req, _, seq_len in judged]
    # the soft tokens come after the prompt: each of their queries sees every prompt key, as laq's steps do
    requests = [ScoreRequest(row, queries, causal=False, pooling_kernel=config.policy_object.pool_width)
                for row, (_, _, config, _), queries in zip(rows, judged, found.queries)]
    freed = 0
    for row, (_, req, config, _), scores in zip(rows, judged, score_requests(requests, found.scaling, key_buffer,
                                                                              attention_mass)):
        keep = _keep_of(scores, config, row, page_size, state, all_reduce, req.cache_protected_len)
        freed += _evict(req, row, keep, state, free)
    return freed


def _missing_model_input(policy: EvictionPolicy, state: EngineState, page_size: int,
                         soft_token_forward: Callable | None) -> str | None:
    """Why ``policy`` cannot run here (a model input it ``uses`` was not read at start, or soft tokens missing or on
    a paged pool), or None when it can."""
    if policy.uses("soft_token_queries"):
        if state.soft_tokens is None or soft_token_forward is None:
            return "this server loaded no soft-token file (--kv-evict-soft-tokens)"
        if page_size > 1:
            # a paged pool frees whole pages: the temporary slots share the prompt's last page
            return f"{policy.name} runs with --page-size 1 only"
    if policy.uses("rope") and state.rope is None:
        return "this model's RoPE could not be read at start"
    if policy.uses("o_proj_weight") and state.value_norm_factors is None:
        return "this model's output projections could not be read at start"
    return None


def prefill_scores(scored: list[PromptToScore], scaling: dict, state: EngineState, key_buffer: Callable,
                   value_buffer: Callable | None, attention_mass: Callable) -> list[torch.Tensor]:
    """Each request's ``[num_layers or 1, num_kv_heads or 1, seq_len]`` scores of its prompt under its policy
    (laq: its provisional snapkv scores): position policies directly, the rest from their window queries (of which
    each policy scores its ``used_window``) through one :func:`~sgl_evict.engine.score_plan.score_requests`: one
    kernel launch per layer for all requests that share its constants."""
    requests, index = [], []
    for entry in scored:
        request = _score_request(entry, state, value_buffer)
        index.append(None if request is None else len(requests))
        if request is not None:
            requests.append(request)
    by_query = score_requests(requests, scaling, key_buffer, attention_mass, one_read_check()) if requests else []
    return [position_scores(entry.config.policy_object, entry.row) if k is None else by_query[k]
            for entry, k in zip(scored, index)]


def _score_request(entry: PromptToScore, state: EngineState, value_buffer: Callable | None) -> ScoreRequest | None:
    """The :class:`~sgl_evict.engine.score_plan.ScoreRequest` of one request's prompt under its policy, or None for
    a policy scored from positions."""
    policy = entry.config.policy_object
    if policy.query_source == POSITIONS:
        return None
    if policy.query_source not in (WINDOW, REROTATED_WINDOW, LOOKAHEAD):
        raise ValueError(f"policy {policy.name!r} is not scored from the prompt's window queries")
    queries = {layer: policy.used_window(q) for layer, q in entry.queries.items()}
    row_lse = {layer: policy.used_window(lse) for layer, lse in entry.row_lse.items()}
    row, row_of = entry.row, entry.row_of
    value_norms = None
    if policy.value_weighted:
        factors = state.value_norm_factors
        slots = (lambda layer: row) if row_of is None else row_of
        value_norms = lambda layer: projected_norms(value_buffer(layer), slots(layer), factors[layer])  # noqa: E731
    rope = state.rope if policy.query_source == REROTATED_WINDOW else None
    return window_request(queries, row, policy.pool_width, rope, value_norms, row_of, row_lse)


def layer_rows(layered, row: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """Layer id -> ``[seq_len]`` the group-slots of the logical ``row`` in that layer's buffer of the layered pool
    (``HOLE`` at holes and where the layer's group dropped the token), one translation per group."""
    pool = layered.get_kvcache()
    index = row.to(torch.int64)  # HOLE (-1) reads group_map's last entry, -1
    per_group: dict[int, torch.Tensor] = {}

    def row_of(layer: int) -> torch.Tensor:
        group = pool.group_of_layer(layer)
        if group not in per_group:
            slots = layered.group_map[group, index]
            per_group[group] = torch.where(slots > 0, slots, torch.full_like(slots, HOLE)).to(row.dtype)
        return per_group[group]
    return row_of


def per_layer_keep(scores: torch.Tensor, layers: list[int] | None, config, row: torch.Tensor, layout: GroupLayout,
                   state: EngineState, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """``[num_groups, seq_len]`` bool keep masks of one request from ``scores [num_scored_layers or 1, kv_heads or 1,
    seq_len]`` (``layers``: each row's layer id; None for position scores, one row every scored group shares):
    :func:`~sgl_evict.engine.group_keep.layout_group_scores` (summed over tensor-parallel ranks), then
    :func:`~sgl_evict.engine.group_keep.layout_keep_masks`; laprox, whose raw scores are comparable across layers,
    with its global split over the scored groups (the harness's ``per_layer`` with ``global_budget``, floor 0).
    Groups of sliding-window layers only keep the prompt's last ``state.protected_recent`` tokens."""
    comparable = config.policy_object.comparable_across_layers
    grouped = layout_group_scores(scores, layers, layout, comparable)
    if all_reduce is not None:
        grouped = all_reduce(grouped)
    return layout_keep_masks(grouped, layout, config, row, state.protected_recent, global_split=comparable)


def group_layout(layered, window_layers: frozenset[int]) -> GroupLayout:
    """The layer groups of the server's layered allocator's pool, ``window_layers`` (sliding-window layer ids)
    marked."""
    pool = layered.get_kvcache()
    return GroupLayout(pool.layer_num, pool.num_groups, window_layers)


def _evict_per_layer(entry: PromptToScore, scores: torch.Tensor, state: EngineState, all_reduce: Callable | None,
                     layered) -> int:
    """One request of a ``per_layer`` server, from its :func:`prefill_scores`: per-group keep masks, applied by
    :func:`~sgl_evict.engine.group_evict.evict_groups` (dropped group-slots freed, tokens no group keeps turned
    into holes in ``row``, in place, and their logical slots freed). Returns group-slots freed."""
    req, config, row = entry.req, entry.config, entry.row
    # a policy that scores positions gives one row, not one per layer
    layers = None if config.policy_object.query_source == POSITIONS else sorted(entry.queries)
    keep = per_layer_keep(scores, layers, config, row, group_layout(layered, state.window_layers), state,
                          all_reduce)
    if env_setting("SGL_EVICT_LOG_KEEP") == "1":
        logger.info("sgl-evict: request %s keeps per group %s", req.rid,
                    [mask.nonzero().flatten().tolist() for mask in keep])
    live_before = count_live(row)
    result = evict_groups(layered, row, keep, owned_from=req.cache_protected_len)
    row.copy_(result.row)
    hidden = live_before - count_live(row) - result.logical_freed
    state.freed_slots += result.logical_freed
    state.freed_group_slots += result.group_slots_freed
    state.hidden_tokens += hidden
    logger.info("sgl-evict: request %s kept %d of %d tokens in some group (%d of %d group-slots), freed %d "
                "group-slots and %d logical slots, hid %d", req.rid, count_live(row), row.shape[0],
                int(keep.sum()), keep.numel(), result.group_slots_freed, result.logical_freed, hidden)
    return result.group_slots_freed


def evict_after_lookahead(batch, state: EngineState, req_to_token: torch.Tensor, key_buffer: Callable,
                          free: Callable[[torch.Tensor], None], attention_mass: Callable,
                          all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, page_size: int = 1) -> int:
    """Evicts from every pending laq request of the decode ``batch`` whose lookahead steps have all run.

    Called after the decode forward and before SGLang processes its result (so a request that finishes in this
    step is released with its holes); each pending request of the batch counts one step processed, and is evicted
    once its last step is (:attr:`~sgl_evict.engine.lookahead.PendingLookahead.processed`). Arguments as
    :func:`evict_after_prefill`. Returns slots freed.
    """
    ready = []
    for req in batch.reqs:
        entry = state.pending_of(req)
        if entry is None:
            continue
        entry.processed = min(entry.processed + 1, entry.decoded)
        config = entry.config if entry.config is not None else state.config_of(req)
        if entry.processed < config.lookahead_steps:
            continue
        if len(entry.steps) < entry.decoded:
            logger.warning("sgl-evict: request %s: %d of %d lookahead steps recorded no queries", req.rid,
                           entry.decoded - len(entry.steps), entry.decoded)
        del state.pending[req.rid]
        row = req_to_token[req.req_pool_idx, :entry.prompt_len]
        ready.append((req, config, row, entry.scaling,
                      lookahead_requests(entry, row, config.policy_object.pool_width)))
    if not ready:
        return 0
    # every ready request's window and lookahead queries in one plan: one launch per layer and kind of query
    scored = iter(score_requests([r for *_, requests in ready for r in requests],
                                 ready[0][3], key_buffer, attention_mass))  # scales: the model's, per layer
    freed = 0
    for req, config, row, _, requests in ready:
        scores = mixed_scores([next(scored) for _ in requests], config.policy_object)
        keep = _keep_of(scores, config, row, page_size, state, all_reduce, req.cache_protected_len)
        freed += _evict(req, row, keep, state, free)
    return freed


def _keep_of(scores: torch.Tensor, config, row: torch.Tensor, page_size: int, state: EngineState,
             all_reduce: Callable[[torch.Tensor], torch.Tensor] | None, prefix: int = 0) -> torch.Tensor:
    """``[seq_len]`` bool keep mask of one request from its ``scores [num_layers, num_kv_heads, seq_len]``, their
    combination summed over tensor-parallel ranks first: every rank must keep the same tokens. ``prefix``: the
    tokens it found in the radix cache (``req.cache_protected_len``; :func:`~sgl_evict.engine.keep.keep_mask`)."""
    return keep_mask(_rank_combined(scores, all_reduce), config, row, page_size, state.protected_recent, prefix)


def _rank_combined(scores: torch.Tensor, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """``[seq_len]`` combined scores, summed over tensor-parallel ranks (every rank must keep the same tokens)."""
    combined = combined_scores(scores)
    return combined if all_reduce is None else all_reduce(combined)


def _evict(req, row: torch.Tensor, keep: torch.Tensor, state: EngineState, free: Callable[[torch.Tensor], None],
           offload: Callable | None = None, combined: torch.Tensor | None = None) -> int:
    """Punches ``req``'s dropped tokens into its prompt ``row``, frees the slots it owns, logs; returns slots freed.
    ``offload`` (history ``restore``): first copies the K and V of the dropped tokens it owns to host memory
    (:meth:`~sgl_evict.engine.reversible_radix_cache.ReversibleRadixCache.offload`), the best by ``combined
    [seq_len]`` scores first when host memory is short."""
    if env_setting("SGL_EVICT_LOG_KEEP") == "1":  # diagnostics: which positions a request kept
        logger.info("sgl-evict: request %s keeps positions %s", req.rid, keep.nonzero().flatten().tolist())
    if offload is not None:  # read before the row's holes are punched (a nonzero: a sync, only with a host pool)
        owned_dropped = is_live(row) & ~keep
        owned_dropped[:req.cache_protected_len] = False
        positions = owned_dropped.nonzero().flatten()
    slots, hidden = evict_from_row(row, keep, owned_from=req.cache_protected_len)
    copied = ""
    if offload is not None:
        # before the slots are freed: the next allocation may overwrite their K and V
        n = offload(req, positions, slots, row.shape[0], None if combined is None else combined[positions])
        copied = f", copied {n} to host memory"
    free(slots)
    state.freed_slots += slots.numel()
    state.hidden_tokens += hidden
    logger.info("sgl-evict: request %s kept %d of %d tokens, freed %d slots, hid %d%s", req.rid, count_live(row),
                row.shape[0], slots.numel(), hidden, copied)
    return slots.numel()


def _backed(candidates: RestoreCandidates) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(positions, host slots, priority)`` of every host-backed hole (all restored, in order)."""
    positions = candidates.backed.nonzero().flatten()
    return positions, candidates.host[positions], torch.zeros(positions.numel())


def _evict_restoring(entry: PromptToScore, state: EngineState, free: Callable, reversible, key_buffer: Callable,
                     attention_mass: Callable, scaling: dict, value_buffer: Callable | None = None) -> int:
    """One request whose prefix has host copies (:mod:`sgl_evict.engine.restore`): every logical token scored,
    the dropped live ones evicted (its own copied to host and freed, restored ones freed), the kept host-backed
    holes restored.
    Returns slots freed (the restored ones count in ``state.restored_tokens``)."""
    req, config, row, candidates = entry.req, entry.config, entry.row, entry.candidates
    policy = config.policy_object
    host_pool, device_pool = reversible.host_pool, reversible.device_pool
    start = getattr(device_pool, "start_layer", 0)

    def host_keys(layer: int, host_slots: torch.Tensor) -> torch.Tensor:
        dtype = key_buffer(layer).dtype
        return host_pool.keys(layer - start, host_slots, row.device).view(dtype)

    def host_values(layer: int, host_slots: torch.Tensor) -> torch.Tensor:
        dtype = value_buffer(layer).dtype
        return host_pool.values(layer - start, host_slots, row.device).view(dtype)

    rope = state.rope if policy.query_source == REROTATED_WINDOW else None
    scores = restore_scores(policy, candidates, row, entry.queries, scaling, key_buffer, host_keys,
                            attention_mass, rope, value_buffer, host_values, state.value_norm_factors)
    combined = combined_scores(scores)
    keep = restore_keep(combined, config, candidates, state.protected_recent)
    # tokens restored earlier (before this prefill, for the previous turn) and now dropped: the request's to free
    freed = reversible.drop_restored(req, keep)
    freed += _evict(req, row, keep & candidates.live, state, free, entry.offload, combined)
    back = (keep & candidates.backed).nonzero().flatten()
    restored = restore_tokens(reversible, req, row, back, candidates.host[back], combined[back])
    state.restored_tokens += restored
    after = "; its last prompt token runs next, over them" if evict_at(req) is not None else ""
    logger.info("sgl-evict: request %s restored %d of its %d held-out tokens from host memory%s", req.rid, restored,
                int(candidates.backed.sum()), after)
    return freed
