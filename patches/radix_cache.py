"""SGLang 0.5.17's token allocators with holes in KV index rows, and the request's radix namespace.

A request's ``req_to_token`` row stays logical; an evicted token's entry is :data:`sgl_evict.holes.HOLE` (-1) and
its slot goes back to the allocator. The radix tree over such rows is SGLang's ``RadixCache`` subclassed
(:class:`sgl_evict.engine.hole_radix_cache.HoleAwareRadixCache`, built through SGLang's radix-cache registry);
what is left here are the hooks outside the tree (registered through HookRegistry by :mod:`sgl_evict.plugin`):

Freeing (every free path of the two allocators ends in one place each, so one hook per allocator):

- ``TokenToKVPoolAllocator.free`` (BEFORE, :func:`token_free_before`): page_size 1. ``free_segment``,
  ``free_segments`` and ``free_group_end`` all end here; a hole would be appended to ``free_pages`` and later
  handed out as slot -1 (the pool's last slot, already in use).
- ``PagedTokenToKVPoolAllocator._release_page_ids`` (BEFORE, :func:`paged_release_before`): page_size > 1.
  ``free`` (unique page ids), ``free_segment`` (page representatives ``free_index[::page_size]``) and
  ``free_group_end`` all end here. Holes are whole pages, so a hole page's representative is HOLE and its page
  id is ``HOLE // page_size == HOLE``: dropping that id frees exactly the live pages.

Namespacing:

- ``Req.__init__`` (AFTER, :func:`req_init_after`): folds the request's eviction fingerprint (server config from
  the scheduler's published ServerArgs, with the request's ``custom_params["kv_evict"]`` applied) into
  ``Req.extra_key``, the radix key's namespace, so compressed KV is only matched by requests that would have
  compressed it the same way. A bad ``kv_evict`` aborts that request (400) instead of raising in the scheduler.
"""

from __future__ import annotations

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.runtime import STATE
from sgl_evict.holes import live, namespaced_extra_key

TOKEN_ALLOCATOR = "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator"
PAGED_ALLOCATOR = "sglang.srt.mem_cache.allocator.paged.PagedTokenToKVPoolAllocator"
REQ = "sglang.srt.managers.schedule_batch.Req"


# ---- freeing ----------------------------------------------------------------------------------------------------

# Holes exist only in a process whose server evicts (a request cannot turn eviction on elsewhere), so without
# eviction every hook below hands straight over to SGLang: dropping holes costs a device-to-host sync per call,
# which SGLang's own free paths avoid.

def token_free_before(allocator, free_index):
    """BEFORE hook on ``TokenToKVPoolAllocator.free(free_index [n])``: frees only the live slots."""
    if not STATE.enabled:
        return None
    return (allocator, live(free_index)), {}


def paged_release_before(allocator, *page_ids):
    """BEFORE hook on ``PagedTokenToKVPoolAllocator._release_page_ids(*page_ids [n_i])``: drops hole pages.

    A hole page's id arrives as ``HOLE // page_size``, which is HOLE for every page_size >= 1.
    """
    if not STATE.enabled:
        return None
    return (allocator, *(live(ids) for ids in page_ids)), {}


# ---- namespacing ------------------------------------------------------------------------------------------------

def server_eviction_config() -> EvictionConfig:
    """The EvictionConfig of the ServerArgs this process published (the scheduler publishes before any Req)."""
    from sglang.srt.runtime_context import get_context

    from sgl_evict.patches.server_args import eviction_config

    # read the slot, not the property: the property raises when nothing is published (a Req built outside a
    # scheduler), and then no server-level eviction is configured
    return eviction_config(get_context()._server_args)


def req_init_after(result, req, *args, **kwargs):
    """AFTER hook on ``Req.__init__``: ``req.extra_key`` gets the request's eviction namespace."""
    from sgl_evict.engine.runtime import request_config

    try:
        config = request_config(server_eviction_config(), req.sampling_params.custom_params)
    except ValueError as err:
        req.set_finish_with_abort(f"kv_evict: {err}")
        return
    req.extra_key = namespaced_extra_key(req.extra_key, config)
