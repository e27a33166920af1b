"""SGLang general plugin (entry point group ``sglang.srt.plugins``).

SGLang calls :func:`register` through ``sglang.srt.plugins.load_plugins`` in ``launch_server`` before it
parses arguments and again in every scheduler process; the hooks below are then applied by
``HookRegistry.apply_hooks``. Each hook module in ``patches/`` names the SGLang function it wraps and why.
"""

from __future__ import annotations

SERVER_ARGS = "sglang.srt.server_args.ServerArgs"


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sgl_evict.patches import server_args
    from sgl_evict.patches import invariant_checker, radix_cache

    HookRegistry.register(f"{SERVER_ARGS}.add_cli_args", server_args.add_cli_args_after, HookType.AFTER)
    HookRegistry.register(f"{SERVER_ARGS}.from_cli_args", server_args.from_cli_args_around, HookType.AROUND)
    # radix cache and allocators with holes (patches/radix_cache.py says why each)
    HookRegistry.register(f"{radix_cache.TOKEN_ALLOCATOR}.free", radix_cache.token_free_before, HookType.BEFORE)
    HookRegistry.register(f"{radix_cache.PAGED_ALLOCATOR}._release_page_ids", radix_cache.paged_release_before,
                          HookType.BEFORE)
    HookRegistry.register(f"{radix_cache.RADIX_CACHE}._insert_helper", radix_cache.insert_helper_around,
                          HookType.AROUND)
    HookRegistry.register(f"{radix_cache.RADIX_CACHE}.inc_lock_ref", radix_cache.inc_lock_ref_around, HookType.AROUND)
    HookRegistry.register(f"{radix_cache.RADIX_CACHE}.dec_lock_ref", radix_cache.dec_lock_ref_around, HookType.AROUND)
    HookRegistry.register(f"{radix_cache.RADIX_CACHE}._delete_leaf", radix_cache.delete_leaf_around, HookType.AROUND)
    HookRegistry.register(f"{radix_cache.RADIX_CACHE}.evict", radix_cache.evict_around, HookType.AROUND)
    HookRegistry.register(f"{radix_cache.RADIX_CACHE}.total_size", radix_cache.live_total_size, HookType.REPLACE)
    HookRegistry.register(f"{radix_cache.RADIX_CACHE}.evictable_size", radix_cache.evictable_size_in_tokens,
                          HookType.REPLACE)
    HookRegistry.register(f"{radix_cache.RADIX_CACHE}.protected_size", radix_cache.protected_size_in_tokens,
                          HookType.REPLACE)
    HookRegistry.register(f"{radix_cache.RADIX_CACHE}._split_node", radix_cache.split_node_after, HookType.AFTER)
    HookRegistry.register(f"{radix_cache.RADIX_CACHE}.match_prefix", radix_cache.match_prefix_around, HookType.AROUND)
    HookRegistry.register(f"{radix_cache.REQ}.__init__", radix_cache.req_init_after, HookType.AFTER)
    # the scheduler's memory check over a layered pool (patches/invariant_checker.py)
    HookRegistry.register(f"{invariant_checker.CHECKER}._check_full_pool", invariant_checker.check_full_pool_around,
                          HookType.AROUND)
    _register_engine_hooks(HookRegistry, HookType)


def _register_engine_hooks(registry, hook_type) -> None:
    """Eviction in the engine: query capture, eviction after prefill, compacted attention (``patches/``)."""
    from sgl_evict.patches import (attention, flashinfer_lse, laprox, layered_backend, layered_pool, lookahead,
                                   model_runner, req_to_token_pool, scheduler)

    registry.register("sglang.srt.managers.scheduler.Scheduler.__init__", scheduler.init_around, hook_type.AROUND)
    registry.register("sglang.srt.managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor"
                      ".process_batch_result_prefill", scheduler.process_batch_result_prefill_around, hook_type.AROUND)
    registry.register("sglang.srt.managers.scheduler.Scheduler.stash_chunked_request",
                      scheduler.stash_chunked_request_around, hook_type.AROUND)
    registry.register("sglang.srt.mem_cache.memory_pool.ReqToTokenPool.__init__", req_to_token_pool.init_after,
                      hook_type.AFTER)
    registry.register("sglang.srt.model_executor.model_runner.ModelRunner.forward", model_runner.forward_around,
                      hook_type.AROUND)
    registry.register("sglang.srt.layers.radix_attention.RadixAttention.forward", attention.forward_around,
                      hook_type.AROUND)
    # the window queries' LSE from FlashInfer's prefill: one-read scoring (patches/flashinfer_lse.py)
    registry.register(f"{flashinfer_lse.BACKEND}.forward_extend", flashinfer_lse.forward_extend_around,
                      hook_type.AROUND)
    registry.register("sglang.srt.model_executor.model_runner.ModelRunner.initialize", laprox.initialize_after,
                      hook_type.AFTER)
    # --kv-evict-granularity per_layer: the layered pool, its allocator and its Triton backend
    registry.register(f"{layered_pool.CONFIGURATOR}._build_mha_kv_pool", layered_pool.build_mha_kv_pool_around,
                      hook_type.AROUND)
    registry.register(f"{layered_pool.CONFIGURATOR}._build_token_to_kv_pool_allocator",
                      layered_pool.build_token_to_kv_pool_allocator_around, hook_type.AROUND)
    registry.register(f"{layered_backend.BACKEND_SETUP}._build_full_attention_backend_from_str",
                      layered_backend.build_full_attention_backend_around, hook_type.AROUND)
    _register_lookahead_hooks(registry, hook_type, lookahead)


def _register_lookahead_hooks(registry, hook_type, lookahead) -> None:
    """laq: pending requests from prefill through their lookahead steps to eviction (``patches/lookahead.py``)."""
    registry.register("sglang.srt.mem_cache.radix_cache.RadixCache.cache_unfinished_req",
                      lookahead.cache_unfinished_req_around, hook_type.AROUND)
    registry.register("sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free", lookahead.req_row_free_before,
                      hook_type.BEFORE)
    registry.register("sglang.srt.model_executor.model_runner.ModelRunner.init_cuda_graphs",
                      lookahead.init_cuda_graphs_before, hook_type.BEFORE)
    registry.register("sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.can_run_graph",
                      lookahead.can_run_graph_around, hook_type.AROUND)
    registry.register("sglang.srt.managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor"
                      ".process_batch_result_decode", lookahead.process_batch_result_decode_around, hook_type.AROUND)
