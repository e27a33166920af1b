"""The scheduler's memory check over a layered pool: ``sglang.srt.managers.scheduler_components.invariant_checker.
SchedulerInvariantChecker._check_full_pool`` (AROUND).

SGLang checks ``available + evictable + protected + session_held + uncached == total`` in tokens, at idle and
(opt-in, ``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY``) every busy step, and reports a leak otherwise. With a
layered allocator (``sgl_evict.engine.layered_allocator``, ``--kv-evict-granularity per_layer``) a token is up to G
group-slots and the counts it reads are rounded token-equivalents (``available_size() = min(free logical, free
group-slots // G)``, the tree's ``evictable_size_ // G``), so the sum misses by a few tokens once some token lost
some groups: a false leak. The hook compares **group-slots** instead: free group-slots + the tree's evictable and
protected group-slots (the radix tree counts them: ``sgl_evict/engine/hole_radix_cache.py``) == the heap. KV held
outside the tree (running requests: ``uncached`` > 0, the busy check; session-held tokens) would have to be counted
from its rows after per-group eviction; that is not built, and the check is skipped then rather than misreported.
With a plain allocator the hook is SGLang's check unchanged.
"""

from __future__ import annotations

CHECKER = "sglang.srt.managers.scheduler_components.invariant_checker.SchedulerInvariantChecker"


def check_full_pool_around(original, checker, pool_stats, uncached: int = 0):
    allocator = checker.token_to_kv_pool_allocator
    groups = getattr(allocator, "num_groups", None)
    if groups is None:
        return original(checker, pool_stats, uncached)
    session_held = checker.pool_stats_observer.session_held_tokens()
    if uncached or session_held:
        return False, (f"[full] layered pool ({groups} groups): {uncached=}, {session_held=}: group-slots outside "
                       f"the tree are not counted, not checked")
    cache = checker.tree_cache
    return checker._check_pool_invariant("full group-slots", allocator.heap_available_size(), cache.evictable_size_,
                                         cache.protected_size_, 0, allocator.heap.size)
