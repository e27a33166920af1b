"""Warm-up at scheduler start: the server's policy scores a dummy prompt once, so its Triton kernels compile then.

Triton compiles a kernel the first time it is launched with a new specialisation (dtypes, constexprs such as the
window and head sizes, the specialised strides). On an H100 that took 0.4 to 2.9 s of a fresh server's first
requests (bench/results/prefill_overhead_2026-11-24_llama-3.1-8b_warm.json). :func:`warm_up` runs the same
engine functions as a real eviction (:func:`sgl_evict.engine.evict_batch.prefill_scores`, ``_keep_of``, laq's
:func:`~sgl_evict.engine.lookahead.lookahead_keep_scores`, judgeq's
:func:`~sgl_evict.engine.keep.lookahead_scores`) on a scratch key (and, for laprox, value) tensor shaped and strided
like one layer's pool buffer, a few hundred slots, with the model's query heads, head size, dtype and scaling, and
the server's window, lookahead steps, soft-token count and page size; snapkv, laq and laprox also once with a window
LSE (the one-read variant of the scoring kernel, what they run on FlashInfer). The arguments that vary per request
(lengths, chunk counts, the slot table's alignment) are not specialised (see ``kernels/paged_scoring.py``), so the
variants compiled here are those real requests launch.

It reads no pool, allocator or ``req_to_token`` contents: only the key buffer's shape, strides, dtype and device.
It never stops the server: an error is logged as a warning and the first requests compile instead. On CPU it does
nothing (no Triton compile to hide), and ``SGL_EVICT_SKIP_WARMUP=1`` turns it off. By default it warms the server's
policy and every other policy a request may pick with ``custom_params`` (:data:`REQUEST_POLICIES`; each is
skipped where the server cannot run it, e.g. a soft-token policy without a soft-token file), so an override does
not stall either; ``SGL_EVICT_WARMUP_POLICIES=snapkv,dapq`` warms those policies only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from sgl_evict.engine.capture import WindowQueryCapture
from sgl_evict.engine.evict_batch import PromptToScore, _keep_of, prefill_scores
from sgl_evict.engine.keep import lookahead_scores, one_read_check_off
from sgl_evict.engine.lookahead import PendingLookahead, lookahead_keep_scores
from sgl_evict.engine.runtime import EngineState
from sgl_evict.env import env_setting
from sgl_evict.policies import POLICIES, policy_class
from sgl_evict.policies.base import LOOKAHEAD, POSITIONS, SOFT_TOKENS

logger = logging.getLogger("sgl_evict")

SKIP_ENV = "SGL_EVICT_SKIP_WARMUP"
#: comma-separated policies to warm up instead of the default (the server's own and :data:`REQUEST_POLICIES`)
POLICIES_ENV = "SGL_EVICT_WARMUP_POLICIES"
#: policies a request can switch to whose scoring runs Triton kernels (every registered policy scored from queries:
#: each source and transform has its own kernel variant): warmed after the server's policy
REQUEST_POLICIES = tuple(name for name, cls in POLICIES.items() if cls.compresses and cls.query_source != POSITIONS)
#: keys of the dummy prompt (at least twice the window): enough for every kernel path, cheap on any GPU
NUM_KEYS = 512


@dataclass(frozen=True)
class LayerShape:
    """What the kernels see of one full-attention layer: its id, query heads on this rank, head size, scaling."""

    layer_id: int
    num_q_heads: int
    head_dim: int
    scaling: float


def layer_shapes(layers) -> list[LayerShape]:
    """One :class:`LayerShape` per distinct (query heads, head size) among SGLang's ``RadixAttention`` ``layers``
    whose queries eviction captures (full attention: ``sliding_window_size == -1``), first layer of each."""
    seen, shapes = set(), []
    for m in layers:
        if m.sliding_window_size != -1 or (m.tp_q_head_num, m.qk_head_dim) in seen:
            continue
        seen.add((m.tp_q_head_num, m.qk_head_dim))
        shapes.append(LayerShape(m.layer_id, m.tp_q_head_num, m.qk_head_dim, float(m.scaling)))
    return shapes


def _scratch_like(buffer: torch.Tensor, slots: int) -> torch.Tensor:
    """``[slots, ...]`` random tensor with ``buffer``'s strides, dtype and device (not a view of it)."""
    out = torch.empty_strided((slots, *buffer.shape[1:]), buffer.stride(), dtype=buffer.dtype, device=buffer.device)
    return out.copy_(torch.randn(out.shape, device=buffer.device).to(buffer.dtype))


def warm_up_layer(state: EngineState, layer: LayerShape, key_buffer: torch.Tensor,
                  value_buffer: torch.Tensor | None, query_dtype: torch.dtype, slot_dtype: torch.dtype,
                  attention_mass: Callable, page_size: int = 1, num_keys: int = NUM_KEYS,
                  policy: str | None = None) -> bool:
    """Runs ``state.config.policy``'s scoring and selection once on a dummy prompt of ``num_keys`` tokens; False
    when the server cannot run that policy (nothing to compile), True otherwise.

    Args:
        key_buffer, value_buffer: the layer's pool buffers (``[pool_slots, num_kv_heads, head_dim]``): only their
            shape, strides, dtype and device are read; the scratch tensors are new.
        query_dtype: the model's dtype (the captured queries').
        slot_dtype: ``req_to_token``'s dtype.
        attention_mass, page_size: as :func:`sgl_evict.engine.evict_batch.evict_after_prefill` gets them.
        policy: another policy than the server's (its other settings kept).
    """
    if policy is not None and policy_class(policy).uses("soft_token_queries") and state.soft_tokens is None:
        return False  # such requests are refused without a soft-token file (and the config would not build)
    config = state.config if policy is None else replace(state.config, policy=policy)
    chosen = config.policy_object
    device = key_buffer.device
    window = config.window
    num_keys = max(num_keys, 2 * window + config.sinks)
    keys = _scratch_like(key_buffer, num_keys)
    values = _scratch_like(value_buffer, num_keys) if value_buffer is not None else None
    row = torch.arange(num_keys, dtype=slot_dtype, device=device)
    lid = layer.layer_id

    def queries(n: int) -> dict[int, torch.Tensor]:
        return {lid: torch.randn(layer.num_q_heads, n, layer.head_dim, device=device).to(query_dtype)}

    key_of = {lid: keys}.__getitem__
    value_of = {lid: values}.__getitem__ if values is not None else None
    scaling = {lid: layer.scaling}
    if chosen.query_source == SOFT_TOKENS:
        if state.soft_tokens is None or page_size > 1:  # such requests are refused then: nothing to compile
            return False
        scores = lookahead_scores(queries(state.soft_tokens.count), scaling, key_of, row, chosen.pool_width,
                                  attention_mass)
    else:
        if chosen.uses("o_proj_weight") and (value_of is None or state.value_norm_factors is None
                                             or lid not in state.value_norm_factors):
            return False
        if chosen.uses("rope") and state.rope is None:
            return False
        window_queries = queries(window)
        prompt = PromptToScore(None, config, row, window_queries, {})
        scores = prefill_scores([prompt], scaling, state, key_of, value_of, attention_mass)[0]
        if chosen.one_read:  # on FlashInfer the same scores run the one-read variant
            lse = _dummy_window_lse(lid, window_queries[lid], num_keys, layer.scaling)
            with one_read_check_off():
                prefill_scores([replace(prompt, row_lse=lse)], scaling, state, key_of, value_of, attention_mass)
        if chosen.query_source == LOOKAHEAD:
            keep = _keep_of(scores, config, row, page_size, state, None)
            steps = max(1, config.lookahead_steps)
            step_queries = queries(steps)[lid]  # one forward's captured queries per step: [1 request, heads, d]
            entry = PendingLookahead(None, num_keys, window_queries, keep, scaling, decoded=steps,
                                     steps=[({lid: step_queries[:, s].unsqueeze(0)}, 0) for s in range(steps)])
            scores = lookahead_keep_scores(entry, key_of, row, chosen.pool_width, attention_mass, chosen)
    _keep_of(scores, config, row, page_size, state, None)
    return True


def _dummy_window_lse(layer_id: int, queries: torch.Tensor, num_keys: int, scaling: float) -> dict[int, torch.Tensor]:
    """Layer id -> ``[num_q_heads, window]`` LSE laid out (dtype, strides) as a real request's: recorded in and handed
    out by a :class:`~sgl_evict.engine.capture.WindowQueryCapture`, as after a FlashInfer prefill. Its values (0)
    only have to be finite: the scores are thrown away."""
    heads, window, dim = queries.shape
    capture = WindowQueryCapture(window)
    capture.begin(0, [num_keys], queries.device)
    capture.record(layer_id, torch.zeros(num_keys, heads * dim, dtype=queries.dtype, device=queries.device), heads,
                   dim, scaling)
    capture.record_lse(layer_id, torch.zeros(window, heads, device=queries.device), [num_keys])
    return capture.lse_of(0, num_keys)[0]


def warm_up(state: EngineState, layers: list[LayerShape], key_buffer: Callable[[int], torch.Tensor],
            value_buffer: Callable[[int], torch.Tensor] | None, query_dtype: torch.dtype, slot_dtype: torch.dtype,
            attention_mass: Callable, page_size: int = 1) -> float | None:
    """:func:`warm_up_layer` for each distinct layer shape, on CUDA only; returns the seconds it took, or None when
    it did not run (eviction off, ``SGL_EVICT_SKIP_WARMUP=1``, not CUDA, no layer) or failed (logged, never
    raised: the first requests then compile the kernels, as without the warm-up)."""
    if not state.enabled or not layers:
        return None
    if env_setting(SKIP_ENV, "0") not in ("", "0"):
        logger.info("sgl-evict: kernel warm-up skipped (%s=%s)", SKIP_ENV, env_setting(SKIP_ENV))
        return None
    policies = [p.strip() for p in env_setting(POLICIES_ENV).split(",") if p.strip()] or list(
        dict.fromkeys((state.config.policy, *REQUEST_POLICIES)))
    try:
        device = key_buffer(layers[0].layer_id).device
    except Exception as err:  # noqa: BLE001 - a warm-up must never stop the server
        logger.warning("sgl-evict: kernel warm-up skipped (%s: %s)", type(err).__name__, err)
        return None
    if device.type != "cuda":
        return None
    start = time.perf_counter()
    warmed = []
    for name in policies:
        try:  # one policy failing leaves the others warm; its first requests compile instead
            with torch.no_grad():
                ran = [warm_up_layer(state, layer, key_buffer(layer.layer_id),
                                     value_buffer(layer.layer_id) if value_buffer is not None else None,
                                     query_dtype, slot_dtype, attention_mass, page_size, policy=name)
                       for layer in layers]
            torch.cuda.synchronize(device)
            if any(ran):
                warmed.append(name)
        except Exception as err:  # noqa: BLE001 - a warm-up must never stop the server
            logger.warning("sgl-evict: kernel warm-up for %s failed (%s: %s); its first requests will compile the "
                           "kernels instead", name, type(err).__name__, err)
    if not warmed:
        return None
    elapsed = time.perf_counter() - start
    logger.info("sgl-evict: warmed up the %s eviction kernels in %.2f s (%d layer shape(s); %s=1 skips this)",
                ",".join(warmed), elapsed, len(layers), SKIP_ENV)
    return elapsed
