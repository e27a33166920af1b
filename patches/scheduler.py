"""Eviction in the scheduler process.

- ``sglang.srt.managers.scheduler.Scheduler.__init__`` (AROUND): sets the process's eviction config from
  ``server_args`` before SGLang builds the pools (the pool hook reads it); once the model runner exists, refuses
  models the engine cannot evict from correctly (hybrid SWA pool, chunked attention, capped attention logits), with
  a message instead of wrong answers, makes every keep-set keep the model's sliding window
  (:func:`sliding_window_tail`), reads the model's RoPE for dapq, with ``--kv-evict-granularity per_layer`` checks
  that the layered pool was built (:mod:`sgl_evict.patches.layered_pool`) and notes the sliding-window layers
  (a group of them only keeps the window),
  and (on CUDA) runs the server's policy once on a scratch tensor so its Triton kernels compile before the first
  request (:func:`warm_up_kernels`).
- ``sglang.srt.managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor
  .process_batch_result_prefill`` (AROUND): after a prefill forward and before SGLang appends the first
  token and inserts the prompt into the radix tree, evicts from the requests whose prefill finished
  (:func:`sgl_evict.engine.evict_batch.evict_after_prefill`; keys and, for laprox, values read from the pool;
  for judgeq, one extra forward of the soft tokens, :class:`sgl_evict.patches.judgeq.SoftTokenForward`; over a
  layered pool, one keep-set per layer group, :func:`layered_allocator`; with a host pool, evicted tokens copied
  to host memory and later turns' kept ones restored, :func:`reversible_tree`).
  Before the tree insert, so the dropped slots the request owns are freed now and the tree stores the holes; the
  prefill's result (its logits and sampled tokens) is computed before and untouched. After SGLang's processing,
  the holes of the requests still running are counted on the host (:func:`count_prefill_holes`).
- ``sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend`` (AFTER): with a host pool, a later
  turn gets back what the previous turn had restored before its prefill forward (:func:`prepare_for_extend_after`).
- ``sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req`` and ``.add_chunked_req`` (AROUND): a later
  turn that will restore evicted tokens has its last prefill chunk cut one token short, so that the last token
  runs alone after the restore and the answer's first token sees what came back
  (:mod:`sgl_evict.engine.last_token`).
- ``sglang.srt.managers.scheduler.Scheduler.is_disable_overlap_for_batch`` (AROUND): under the overlap scheduler
  (on where verified), the result of a batch whose processing evicts is processed before the
  next forward launches (:mod:`sgl_evict.engine.overlap`); the result hooks then wait for their forward first.
- ``sglang.srt.managers.scheduler.Scheduler.stash_chunked_request`` (AROUND): between the chunks of a long prompt
  SGLang inserts the chunks done so far into the radix tree, which then owns their slots, so eviction after the
  last chunk could only hide them. For a request that will be evicted, the hook keeps the chunks with the request
  instead, as SGLang's ``ChunkCache`` does (``prefix_indices`` = its own row), and the final insert happens after
  eviction.
"""

from __future__ import annotations

import logging

import torch

from sgl_evict.engine.evict_batch import evict_after_prefill
from sgl_evict.engine.last_token import cut, forget_cut, last_token_chunk, wants_cut
from sgl_evict.engine.overlap import must_process_first
from sgl_evict.engine.runtime import STATE
from sgl_evict.engine.warmup import layer_shapes, warm_up
from sgl_evict.patches.judgeq import SoftTokenForward, load_soft_tokens
from sgl_evict.patches.server_args import eviction_config
from sgl_evict.rope import RopeSpec


def init_around(original, self, server_args, *args, **kwargs):
    STATE.configure(eviction_config(server_args))
    result = original(self, server_args, *args, **kwargs)
    if STATE.enabled:
        layers = _attention_layers(self.tp_worker.model_runner.model)
        check_model_support(self.tp_worker, layers)
        STATE.protected_recent = sliding_window_tail(layers)
        STATE.window_layers = frozenset(m.layer_id for m in layers if m.sliding_window_size >= 0)
        if STATE.protected_recent:
            logging.getLogger("sgl_evict").info(
                "sgl-evict: this model has sliding-window layers: every request keeps its last %d prompt tokens "
                "(within its budget, above it for short prompts)", STATE.protected_recent)
        STATE.rope = _model_rope(self.model_config.hf_text_config, STATE.config.policy_object.uses("rope"))
        STATE.soft_tokens = load_soft_tokens(self)
        if STATE.config.granularity == "per_layer":
            check_per_layer_pool(self.token_to_kv_pool_allocator, STATE.window_layers)
        warm_up_kernels(self, layers)
    return result


def warm_up_kernels(scheduler, layers) -> float | None:
    """Compiles the server's policy's Triton kernels now rather than on its first requests
    (:mod:`sgl_evict.engine.warmup`): on a scratch tensor shaped like one layer's key buffer, never the pool.
    Returns the seconds it took, or None when it did not run (CPU, ``SGL_EVICT_SKIP_WARMUP=1``) or failed (logged
    as a warning: the server starts anyway)."""
    runner = scheduler.tp_worker.model_runner
    if not str(getattr(runner, "device", "cpu")).startswith("cuda"):
        return None  # no compile to hide (and the CPU stand-ins of the tests have no pool)
    try:
        args = pool_arguments(scheduler)
        value_buffer = scheduler.token_to_kv_pool_allocator.get_kvcache().get_value_buffer
        query_dtype = getattr(runner, "dtype", None) or args["key_buffer"](layers[0].layer_id).dtype
    except Exception as err:  # noqa: BLE001 - the warm-up never stops the server
        logging.getLogger("sgl_evict").warning("sgl-evict: kernel warm-up skipped: %s: %s", type(err).__name__, err)
        return None
    return warm_up(STATE, layer_shapes(layers), args["key_buffer"], value_buffer, query_dtype,
                   args["req_to_token"].dtype, args["attention_mass"], args["page_size"])


def layered_allocator(allocator):
    """The allocator when it is a layered one (``--kv-evict-granularity per_layer``), else None."""
    from sgl_evict.engine.layered_allocator import LayeredTokenToKVPoolAllocator

    return allocator if isinstance(allocator, LayeredTokenToKVPoolAllocator) else None


def prepare_for_extend_after(result, batch, *args, **kwargs):
    """AFTER hook on ``ScheduleBatch.prepare_for_extend``: the batch's rows hold their matched prefixes now, and
    the forward has not run. A request with ``history`` ``restore`` gets back the tokens the previous turns along
    its path had restored (:func:`~sgl_evict.engine.restore.restore_before_prefill`), so its prefill, and its
    first token, see them. A no-op after the first chunk (those tokens are live then)."""
    tree = reversible_tree(getattr(batch, "tree_cache", None))
    if tree is None or not STATE.enabled:
        return None
    from sgl_evict.engine.restore import restore_before_prefill

    req_to_token = batch.req_to_token_pool.req_to_token
    for req in batch.reqs:
        if req.cache_protected_len == 0 or STATE.config_of(req).history != "restore":
            continue
        if last_token_chunk(req):  # evicted and restored after the cut chunk already
            continue
        row = req_to_token[req.req_pool_idx, :req.cache_protected_len]
        restored = restore_before_prefill(tree, req, row)
        if restored:
            STATE.restored_tokens += restored
            logging.getLogger("sgl_evict").info("sgl-evict: request %s brought back %d tokens the previous turn "
                                                "kept, before its prefill", req.rid, restored)
    return None


def add_one_req_around(original, self, req, *args, **kwargs):
    """AROUND hook on ``PrefillAdder.add_one_req``: a request whose whole prompt SGLang takes in this batch, and
    that will restore evicted tokens after it, stops one token short as a chunked request
    (:mod:`sgl_evict.engine.last_token`); the adder then takes no more requests, as after any chunk."""
    result = original(self, req, *args, **kwargs)
    if not (self.can_run_list and self.can_run_list[-1] is req):
        return result  # not taken
    forget_cut(req)  # a retracted request's earlier cut, if any
    # another request's chunks still running: SGLang holds one chunked request at a time
    chunking = kwargs.get("has_chunked_req", args[0] if args else False)
    align = kwargs.get("truncation_align_size", args[1] if len(args) > 1 else None)
    if self.new_chunked_req is not None or chunking or align is not None or not _may_cut(self, req):
        return result
    cut(req)
    self.new_chunked_req = req
    from sglang.srt.managers.schedule_policy import AddReqResult

    return result if result == AddReqResult.NO_TOKEN else AddReqResult.OTHER


def add_chunked_req_around(original, self, req, *args, **kwargs):
    """AROUND hook on ``PrefillAdder.add_chunked_req``: a chunked prompt's last chunk stops one token short as
    :func:`add_one_req_around`'s does (the request stays SGLang's chunked one)."""
    result = original(self, req, *args, **kwargs)
    if result is None and self.can_run_list and self.can_run_list[-1] is req and _may_cut(self, req):
        cut(req)
        return req
    return result


def _may_cut(adder, req) -> bool:
    """Chunked prefill on (SGLang's chunked-request path then carries the last token on), no dLLM or hybrid SWA
    budget of its own, and :func:`~sgl_evict.engine.last_token.wants_cut`."""
    if adder.rem_chunk_tokens is None or getattr(adder, "dllm_config", None) is not None:
        return False
    if getattr(adder, "is_hybrid_swa", False):
        return False
    return wants_cut(req, reversible_tree(adder.tree_cache), STATE)


def reversible_tree(tree_cache):
    """The radix tree when it keeps host copies of evicted tokens (``--kv-evict-host-pool-gb``: a
    :class:`~sgl_evict.engine.reversible_radix_cache.ReversibleRadixCache`, known by its host pool without importing
    SGLang's tree), else None."""
    return tree_cache if getattr(tree_cache, "host_pool", None) is not None else None


def check_per_layer_pool(allocator, window_layers: frozenset[int]) -> None:
    """RuntimeError unless a per_layer server got its layered allocator; logs how its layer groups split between
    full-attention and sliding-window layers (``window_layers``: the model's sliding-window layer ids)."""
    if layered_allocator(allocator) is None:
        raise RuntimeError(f"sgl-evict: --kv-evict-granularity per_layer, but this scheduler's KV allocator is "
                           f"{type(allocator).__name__}, not the layered one (was the pool built by SGLang's "
                           "KVCacheConfigurator._build_mha_kv_pool?)")
    if window_layers:
        from sgl_evict.engine.evict_batch import group_layout

        try:
            layout = group_layout(allocator, window_layers)
        except ValueError as err:  # every layer has a sliding window: no layer to select for
            raise RuntimeError(f"sgl-evict: --kv-evict-granularity per_layer: {err}") from None
        logging.getLogger("sgl_evict").info(
            "sgl-evict: per_layer with %d layer groups: %d keep the last %d prompt tokens only (sliding-window "
            "layers), %d select from their full-attention layers (%d of them also hold sliding-window layers, "
            "which keep that keep-set)", layout.num_groups, len(layout.window_only_groups), STATE.protected_recent,
            len(layout.scored_groups), len(layout.mixed_groups()))


def _attention_layers(model) -> list:
    """The model's SGLang ``RadixAttention`` modules."""
    from sglang.srt.layers.radix_attention import RadixAttention

    return [m for m in model.modules() if isinstance(m, RadixAttention)]


def check_model_support(tp_worker, layers) -> None:
    """RuntimeError for models whose attention would read the compacted rows wrongly, or be scored wrongly.

    ``tp_worker``: SGLang's ``TpModelWorker`` (``is_hybrid_swa``, ``model_runner.model_config``); ``layers``: the
    model's ``RadixAttention`` modules.
    """
    if tp_worker.is_hybrid_swa:
        # SWAKVPool gives sliding-window layers a slot space of their own (full_to_swa_index_mapping), which
        # neither the holes nor the compacted rows cover; --kv-evict-policy turns it off at launch
        raise RuntimeError("sgl-evict: this server uses SGLang's hybrid SWA memory pool, which eviction does not "
                           "handle; launch with --disable-hybrid-swa-memory")
    if getattr(tp_worker.model_runner.model_config, "attention_chunk_size", None) is not None:
        # chunked attention (Llama 4) cuts the KV at absolute chunk boundaries, which a compacted row moves
        raise RuntimeError("sgl-evict: this model uses chunked attention (attention_chunk_size), which eviction "
                           "inside the server does not support; launch without --kv-evict-policy")
    capped = sorted(m.layer_id for m in layers if m.sliding_window_size == -1 and m.logit_cap > 0)
    if capped:
        # the scoring kernel computes plain softmax(q k * scaling): capped logits would rank keys differently
        raise RuntimeError(f"sgl-evict: this model caps its attention logits (logit_cap, layers {capped}), which the "
                           "eviction scores do not apply; launch without --kv-evict-policy")


def sliding_window_tail(layers) -> int:
    """Trailing prompt tokens every keep-set must keep so sliding-window layers see what they would unevicted.

    SGLang's backends give a sliding-window layer the last ``sliding_window_size + 1`` entries of a request's row
    (FlashInfer: ``kv_start_idx = seq_len - min(seq_len, sliding_window_size + 1)``; Triton: the last
    ``sliding_window_size``, masked by row-index distance), never positions. A compacted row whose logical tail is
    whole ends in exactly the logical row's last entries (decode tokens are never evicted), so those layers read
    the same tokens. Gemma 3: ``sliding_window_size`` 511 (HF ``sliding_window`` 512, current token included),
    tail 512. 0 when the model has no sliding-window layer.
    """
    return max((m.sliding_window_size + 1 for m in layers if m.sliding_window_size >= 0), default=0)


def _model_rope(hf_config, required: bool) -> RopeSpec | None:
    """The model's RoPE for dapq; None (dapq requests then keep their full cache, logged) if the config cannot
    be read and the server's own policy does not need it."""
    try:
        return RopeSpec.from_config(hf_config)
    except Exception as err:  # any config shape RopeSpec does not understand
        if required:
            raise RuntimeError(f"sgl-evict: cannot read this model's RoPE for --kv-evict-policy dapq: {err}") from err
        logging.getLogger("sgl_evict").warning("cannot read this model's RoPE (%s): dapq requests will not evict", err)
        return None


def pool_arguments(scheduler) -> dict:
    """What eviction reads, frees and reduces with in this scheduler process (SGLang's ``Scheduler``): the keyword
    arguments ``req_to_token, key_buffer, free, attention_mass, all_reduce, page_size`` of
    :func:`~sgl_evict.engine.evict_batch.evict_after_prefill` and ``evict_after_lookahead``."""
    from sgl_evict.kernels.paged_scoring import attention_mass_paged

    all_reduce = None
    if scheduler.server_args.tp_size > 1:
        from sglang.srt.distributed import tensor_model_parallel_all_reduce as all_reduce
    allocator = scheduler.token_to_kv_pool_allocator
    return {"req_to_token": scheduler.req_to_token_pool.req_to_token,
            "key_buffer": allocator.get_kvcache().get_key_buffer, "free": allocator.free,
            "attention_mass": attention_mass_paged, "all_reduce": all_reduce, "page_size": allocator.page_size}


def wait_for_forward(processor, result) -> None:
    """Under the overlap scheduler a result is processed while the scheduler's streams run ahead of its forward;
    eviction reads that forward's keys and captured queries, so it first waits for the forward to finish, on the
    event SGLang's own processing waits for next (``processor``: SGLang's ``SchedulerBatchResultProcessor``)."""
    done = getattr(result, "copy_done", None)
    if getattr(processor, "enable_overlap", False) and done is not None:
        done.synchronize()


def is_disable_overlap_for_batch_around(original, self, batch, *args, **kwargs):
    """The overlap scheduler processes the last batch's result before launching ``batch`` when SGLang wants it, and
    when processing it evicts (:func:`sgl_evict.engine.overlap.must_process_first`). The batch judged is the
    launch-time copy queued with that result (``Scheduler.result_queue``), not ``last_batch``, which
    ``get_next_batch_to_run`` has already turned into the next decode batch."""
    queue = getattr(self, "result_queue", None)
    unprocessed = queue[-1][0] if queue else None
    return original(self, batch, *args, **kwargs) or must_process_first(unprocessed, STATE)


def process_batch_result_prefill_around(original, self, batch, result, *args, **kwargs):
    if STATE.enabled:
        wait_for_forward(self, result)
        value_buffer = self.token_to_kv_pool_allocator.get_kvcache().get_value_buffer
        soft_token_forward = SoftTokenForward(self, batch) if STATE.soft_tokens is not None else None
        evict_after_prefill(batch, STATE, **pool_arguments(self), value_buffer=value_buffer,
                            soft_token_forward=soft_token_forward,
                            layered=layered_allocator(self.token_to_kv_pool_allocator),
                            reversible=reversible_tree(getattr(self, "tree_cache", None)))
    processed = original(self, batch, result, *args, **kwargs)
    if STATE.enabled:
        count_prefill_holes(batch, self.req_to_token_pool.req_to_token)
    return processed


def count_prefill_holes(batch, req_to_token) -> None:
    """Counts, on the host, the holes of the batch's requests still running once SGLang processed their prefill
    (its radix insert may have written the tree's entries into their rows): decode forwards read their kept lengths
    from these counts (:mod:`sgl_evict.engine.hole_counts`)."""
    running = [(req, int(n)) for req, n in zip(batch.reqs, batch.seq_lens_cpu)
               if req.req_pool_idx is not None and not req.finished()]
    if running:
        STATE.holes.recount([req for req, _ in running], req_to_token, [n for _, n in running])


def stash_chunked_request_around(original, self, req, *args, **kwargs):
    if not STATE.enabled or self.tree_cache.is_chunk_cache() or not STATE.config_of(req).enabled:
        return original(self, req, *args, **kwargs)
    row = self.req_to_token_pool.req_to_token[req.req_pool_idx, : req.extend_range.end]
    req.prefix_indices = row.to(dtype=torch.int64, copy=True)
