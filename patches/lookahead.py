"""laq inside the server: the hooks that carry a request from prefill through its lookahead steps to eviction.

After prefill a laq request is *pending* (:mod:`sgl_evict.engine.lookahead`): the snapkv keep-set is only hidden
from its first ``lookahead_steps`` decode forwards, its row keeps every slot, and the radix tree leaves its prompt
to it (:meth:`sgl_evict.engine.hole_radix_cache.HoleAwareRadixCache.cache_unfinished_req`). Registered by
:mod:`sgl_evict.plugin`:

- ``sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free`` (BEFORE, :func:`req_row_free_before`): every way a
  request leaves (finished, aborted, retracted) ends by freeing its row there. Its host-side hole count is dropped
  (:mod:`sgl_evict.engine.hole_counts`). A request that leaves while pending drops its entry, so its row can be
  handed to another request; it kept its full cache, which SGLang releases (and caches) as usual.
- ``sglang.srt.model_executor.model_runner.ModelRunner.init_cuda_graphs`` (BEFORE, :func:`init_cuda_graphs_before`):
  allocates the decode query capture's static buffers before the decode graphs are captured (a graph records the
  tensors it writes; see :class:`sgl_evict.engine.capture.DecodeQueryCapture`).
- ``sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.can_run_graph`` (AROUND,
  :func:`can_run_graph_around`): a decode batch with more pending requests than a replay can gather runs eagerly.
- ``sglang.srt.managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor
  .process_batch_result_decode`` (AROUND, :func:`process_batch_result_decode_around`): after the decode forward
  and before SGLang appends its tokens and releases finished requests, evicts from the pending requests whose
  lookahead steps have all run (:func:`sgl_evict.engine.evict_batch.evict_after_lookahead`) and counts their holes
  on the host.
"""

from __future__ import annotations

import logging

from sgl_evict.engine.evict_batch import evict_after_lookahead
from sgl_evict.engine.runtime import STATE
from sgl_evict.patches.scheduler import pool_arguments, wait_for_forward

logger = logging.getLogger("sgl_evict")

#: pending laq requests one decode graph replay can gather queries for; more in one batch run eagerly
GRAPH_CAPACITY = 32


def req_row_free_before(pool, req, *args, **kwargs):
    if STATE.enabled:
        STATE.holes.forget(req.rid)
    entry = STATE.pending_of(req) if STATE.enabled else None
    if entry is not None:
        del STATE.pending[req.rid]
        logger.info("sgl-evict: request %s ended after %d of its laq lookahead steps: its cache was kept as "
                    "after prefill (in full, or its --kv-evict-lookahead-reserve)", req.rid, entry.decoded)
    return None


def init_cuda_graphs_before(runner, *args, **kwargs):
    if not STATE.enabled or STATE.decode_capture is None:
        return None
    from sglang.srt.layers.radix_attention import RadixAttention

    layers = {m.layer_id: (m.tp_q_head_num, m.qk_head_dim) for m in runner.model.modules()
              if isinstance(m, RadixAttention) and m.sliding_window_size == -1}
    STATE.decode_capture.allocate(layers, min(GRAPH_CAPACITY, runner.req_to_token_pool.size), runner.dtype,
                                  runner.device)
    return None


def can_run_graph_around(original, graph_runner, forward_batch, *args, **kwargs):
    decode = STATE.decode_capture
    if decode is not None and decode.needs_eager:
        return False
    return original(graph_runner, forward_batch, *args, **kwargs)


def process_batch_result_decode_around(original, self, batch, result, *args, **kwargs):
    if STATE.enabled and STATE.pending:
        wait_for_forward(self, result)
        prompt_lens = {req.rid: STATE.pending_of(req).prompt_len for req in batch.reqs
                       if STATE.pending_of(req) is not None}
        arguments = pool_arguments(self)
        evict_after_lookahead(batch, STATE, **arguments)
        evicted = [req for req in batch.reqs if req.rid in prompt_lens and STATE.pending_of(req) is None]
        if evicted:  # their holes, counted on the host for the decode forwards to come
            STATE.holes.recount(evicted, arguments["req_to_token"], [prompt_lens[req.rid] for req in evicted])
    return original(self, batch, result, *args, **kwargs)
