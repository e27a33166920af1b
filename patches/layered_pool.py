"""The layered KV pool in the server (``--kv-evict-granularity per_layer``; issue 9, design step 4).

SGLang 0.5.17's ``ModelRunner.alloc_memory_pool`` sizes the KV pool from the memory left after loading the model
(``KVCacheConfigurator.configure``) and builds the pools in ``KVCacheConfigurator._init_pools``; for a plain MHA
model that calls the two functions wrapped here (AROUND, registered by :mod:`sgl_evict.plugin`):

- ``sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_mha_kv_pool``: SGLang picks the pool
  class and passes it every sizing argument (token count, heads, layers, dtype, device, layer range). The hook runs
  SGLang's function with a factory in place of the class, so the arguments stay SGLang's, and the factory builds a
  :class:`~sgl_evict.engine.layered_kv_pool.LayeredMHATokenToKVPool` of ``G x size`` group-slots instead.
- ``...KVCacheConfigurator._build_token_to_kv_pool_allocator``: SGLang would build a ``TokenToKVPoolAllocator``
  over ``size`` slots; over a layered pool the hook builds a
  :class:`~sgl_evict.engine.layered_allocator.LayeredTokenToKVPoolAllocator` (logical slots backed by group-slots).

Sizing (``size`` = SGLang's ``max_total_num_tokens`` S, L layers, G groups): SGLang's pool holds ``(S + 1) x L``
rows of K (and of V). The layered heap holds ``G x S`` group-slots (+ 1 padding) of ``L / G`` layers each:
``(G x S + 1) x L / G = S x L + L / G`` rows, the same bytes (``L - L / G`` rows fewer). A token live in every
group takes G group-slots, so the pool still holds S full tokens (``available_size() = min(free logical, free
group-slots // G)``, SGLang's ``max_total_num_tokens`` unchanged); once groups drop tokens, their group-slots hold
other requests' tokens, so the pool holds more tokens than S: that is why the **logical** slot count is
:data:`LOGICAL_SLOTS_PER_TOKEN` x S, larger than the physical one. Logical slots cost no KV, only the allocator's
``group_map`` (``G x 4 S`` int32 = ``16 G S`` bytes, e.g. 0.4 % of Llama-3.1-8B's KV bytes at G = 32) and free
lists; they come out of SGLang's memory headroom (the profile does not count them). With eviction on, logical slots
bind only when requests keep, on average, a union of per-group keep-sets above 4 times what each group keeps.

A draft worker's pool (speculative decoding, refused with eviction) and every other pool family are left to SGLang;
a per_layer server whose model takes another pool family fails at the allocator with a message.
"""

from __future__ import annotations

from sgl_evict.engine.runtime import STATE
from sgl_evict.patches.server_args import resolve_layer_groups

CONFIGURATOR = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
LOGICAL_SLOTS_PER_TOKEN = 4
"""Logical slots per token of SGLang's pool size: what lets the layered pool hold more tokens than its size once
layer groups drop some of them (module docstring)."""


def _per_layer(configurator) -> bool:
    return STATE.config.granularity == "per_layer" and not getattr(configurator, "is_draft_worker", False)


def layered_pool_class(num_groups: int):
    """A stand-in for SGLang's pool class: called with ``MHATokenToKVPool``'s arguments, builds the layered pool of
    ``num_groups x size`` group-slots."""
    from sgl_evict.engine.layered_kv_pool import LayeredMHATokenToKVPool

    def build(size, page_size, dtype, head_num, head_dim, layer_num, device, enable_memory_saver, *,
              v_head_dim=None, start_layer=None, end_layer=None, post_capture_active=False, **ignored):
        # ignored: enable_alt_stream (the pool's store runs on the caller's stream), enable_kv_cache_copy (slot
        # moves, speculative decoding only: refused by the layered pool)
        if page_size != 1:
            raise RuntimeError(f"sgl-evict: --kv-evict-granularity per_layer runs with --page-size 1 only (the pool "
                               f"is paged by {page_size})")
        if post_capture_active:
            raise RuntimeError("sgl-evict: --kv-evict-granularity per_layer does not support post-capture KV pool "
                               "resizing")
        return LayeredMHATokenToKVPool(num_groups * size, num_groups, dtype, head_num, head_dim, layer_num, device,
                                       enable_memory_saver, v_head_dim=v_head_dim, start_layer=start_layer,
                                       end_layer=end_layer)
    return build


def build_mha_kv_pool_around(original, self, *args, **kwargs):
    """AROUND ``KVCacheConfigurator._build_mha_kv_pool(self, *, max_total_num_tokens, mha_pool_class,
    quant_method=None)``."""
    if not _per_layer(self):
        return original(self, *args, **kwargs)
    if kwargs.get("quant_method") is not None:
        raise RuntimeError("sgl-evict: --kv-evict-granularity per_layer does not support quantized KV caches")
    groups = resolve_layer_groups(STATE.config.layer_groups, self.layer_info.num_effective_layers)
    kwargs["mha_pool_class"] = layered_pool_class(groups)
    pool = original(self, *args, **kwargs)
    _require_layered(pool)
    return pool


def build_token_to_kv_pool_allocator_around(original, self, *args, sizes, token_to_kv_pool, **kwargs):
    """AROUND ``KVCacheConfigurator._build_token_to_kv_pool_allocator(self, *, sizes, token_to_kv_pool,
    is_dsv4_model, req_to_token_pool, token_to_kv_pool_allocator)``."""
    if not _per_layer(self):
        return original(self, *args, sizes=sizes, token_to_kv_pool=token_to_kv_pool, **kwargs)
    from sgl_evict.engine.layered_allocator import LayeredTokenToKVPoolAllocator

    _require_layered(token_to_kv_pool)
    size = sizes.max_total_num_tokens
    need_sort = getattr(self.server_args, "disaggregation_mode", "null") in ("decode", "prefill")  # as SGLang's
    return LayeredTokenToKVPoolAllocator(LOGICAL_SLOTS_PER_TOKEN * size, token_to_kv_pool.size,
                                         token_to_kv_pool.num_groups, self.kv_cache_dtype, self.device,
                                         token_to_kv_pool, need_sort=need_sort)


def _require_layered(pool) -> None:
    from sgl_evict.engine.layered_kv_pool import LayeredMHATokenToKVPool

    if not isinstance(pool, LayeredMHATokenToKVPool):
        raise RuntimeError(f"sgl-evict: --kv-evict-granularity per_layer builds its layered pool for plain MHA "
                           f"models with 16-bit KV only; SGLang built {type(pool).__name__} for this model")
