"""SGLang 0.5.17's radix (prefix) cache and token allocators with holes in KV index rows.

A request's ``req_to_token`` row stays logical; an evicted token's entry is :data:`sgl_evict.holes.HOLE` (-1) and
its slot goes back to the allocator. Tree values (``TreeNode.value``, copies of such rows) keep the holes, so
``match_prefix`` still returns one entry per matched token (the scheduler's prefix length stays logical) and
``_split_node`` keeps every hole at its position. What SGLang gets wrong with holes, and the hook that fixes it
(registered through HookRegistry by :mod:`sgl_evict.plugin`; targets are the ``*_TARGET`` names below):

Freeing (every free path of the two allocators ends in one place each, so one hook per allocator):

- ``TokenToKVPoolAllocator.free`` (BEFORE, :func:`token_free_before`): page_size 1. ``free_segment``,
  ``free_segments`` and ``free_group_end`` all end here; a hole would be appended to ``free_pages`` and later
  handed out as slot -1 (the pool's last slot, already in use).
- ``PagedTokenToKVPoolAllocator._release_page_ids`` (BEFORE, :func:`paged_release_before`): page_size > 1.
  ``free`` (unique page ids), ``free_segment`` (page representatives ``free_index[::page_size]``) and
  ``free_group_end`` all end here. Holes are whole pages, so a hole page's representative is HOLE and its page
  id is ``HOLE // page_size == HOLE``: dropping that id frees exactly the live pages.

Counting (SGLang counts a node's tokens as ``len(node.key)``; the scheduler admits requests against
``available_size() + evictable_size()``, so counting holes as memory would over-admit, i.e. run out of KV):

- ``RadixCache._insert_helper`` (AROUND): a new leaf adds its live slots to ``evictable_size_``.
- ``RadixCache.inc_lock_ref`` / ``dec_lock_ref`` (AROUND): a node whose lock goes 0 -> 1 (1 -> 0) moves its live
  slots between ``evictable_size_`` and ``protected_size_``, and the returned delta says so.
- ``RadixCache._delete_leaf`` (AROUND): a deleted leaf takes its live slots out of ``evictable_size_``.
- ``RadixCache.evict`` (AROUND): SGLang stops once it has deleted ``num_tokens`` logical tokens, which with holes
  can free fewer slots than asked; the hook repeats it until that many live slots are freed or nothing is
  evictable, and reports the live slots freed.
- ``RadixCache.total_size`` (REPLACE): live slots in the tree.

Layered pool (``sgl_evict.engine.layered_allocator``, built with ``--kv-evict-granularity per_layer``): tree values stay
logical slots, but a node's memory is its live group-slots (up to G per token). With such an allocator the
counters above (``evictable_size_``, ``protected_size_``, lock deltas) count group-slots, ``evict(n)`` frees
``n x G`` of them, and what the scheduler reads is in token-equivalents (``// G``); with a plain allocator every
hook behaves as described above:

- ``RadixCache.evictable_size`` / ``protected_size`` (REPLACE): the counters ``// G``.
- ``RadixCache._split_node`` (AFTER, :func:`split_node_after`): both halves count their group-slots while live.

Sliding-window models (the engine keeps every evicted prompt's last ``STATE.protected_recent`` tokens, so those
layers, which read a row's last entries, see what they would unevicted; docs/plugin.md):

- ``RadixCache.match_prefix`` (AROUND, :func:`match_prefix_around`): a request's match (``params.req`` set, as
  ``Req.init_next_round_input`` passes it) may end inside another request's evicted region, with holes among its
  last ``protected_recent`` entries; it is cut to the longest prefix whose tail is whole (``RadixKey.limit``) and
  the request computes the rest itself. With a layered allocator a token some layer group dropped counts as a hole
  there (:func:`window_view`): a group of sliding-window layers keeps only each prompt's tail. SGLang's own
  re-matches (``cache_unfinished_req``, no ``req``) are left alone: they must return the whole inserted key.
- ``RadixCache.cache_unfinished_req``: at prefill end SGLang would write the tree's values, holes and all, over
  the request's own KV of the part it recomputed; :func:`tree_holes_in_tail` tells the hook of
  :mod:`sgl_evict.patches.lookahead` to keep the request's prompt instead, as for a pending laq request.

Namespacing:

- ``Req.__init__`` (AFTER, :func:`req_init_after`): folds the request's eviction fingerprint (server config from
  the scheduler's published ServerArgs, with the request's ``custom_params["kv_evict"]`` applied) into
  ``Req.extra_key``, the radix key's namespace, so compressed KV is only matched by requests that would have
  compressed it the same way. A bad ``kv_evict`` aborts that request (400) instead of raising in the scheduler.
"""

from __future__ import annotations

import dataclasses

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.runtime import STATE
from sgl_evict.holes import HOLE, count_live, live, namespaced_extra_key, whole_tail_prefix

TOKEN_ALLOCATOR = "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator"
PAGED_ALLOCATOR = "sglang.srt.mem_cache.allocator.paged.PagedTokenToKVPoolAllocator"
RADIX_CACHE = "sglang.srt.mem_cache.radix_cache.RadixCache"
REQ = "sglang.srt.managers.schedule_batch.Req"
#: TreeNode attribute: the node's live group-slots under a layered allocator (:func:`slots_of`)
LAYERED_SLOTS = "sgl_evict_group_slots"


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


# ---- counting ---------------------------------------------------------------------------------------------------

def group_count(cache) -> int:
    """KV units a new token takes: 1, or G with a layered allocator (``sgl_evict.engine.layered_allocator``)."""
    return getattr(cache.token_to_kv_pool_allocator, "num_groups", 1)


def slots_of(cache, node) -> int:
    """KV units a tree node holds: its live slots, or with a layered allocator its live group-slots.

    A node's group-slots are counted while they are live (insert, :func:`split_node_after`) and kept on the node:
    SGLang's ``evict`` frees a leaf's slots before ``_delete_leaf``, when the table no longer shows them. The count
    cannot change in between, because only the slots a request owns are dropped per group, never the tree's.
    """
    if not hasattr(cache.token_to_kv_pool_allocator, "group_slots_of"):
        return count_live(node.value)
    if not hasattr(node, LAYERED_SLOTS):
        setattr(node, LAYERED_SLOTS, cache.token_to_kv_pool_allocator.group_slots_of(node.value))
    return getattr(node, LAYERED_SLOTS)


def holes_of(cache, node) -> int:
    """What SGLang's count of a node (``len(node.key)``) exceeds its KV units by; negative with a layered
    allocator, where a token live in every group holds G group-slots."""
    return len(node.key) - slots_of(cache, node)


def _path_to_root(cache, node):
    """The nodes from ``node`` up to (not including) the root: what lock-ref changes walk."""
    while node is not cache.root_node:
        yield node
        node = node.parent


def insert_helper_around(original, cache, node, key, value, *args, **kwargs):
    """AROUND hook on ``RadixCache._insert_helper``: the new leaf counts its live slots as evictable."""
    if not STATE.enabled:
        return original(cache, node, key, value, *args, **kwargs)
    before = cache.evictable_size_
    prefix_len, last_node = original(cache, node, key, value, *args, **kwargs)
    # evictable_size_ changes in _insert_helper only when it adds a leaf, and then that leaf is the returned node
    if cache.evictable_size_ != before:
        cache.evictable_size_ -= holes_of(cache, last_node)
    return prefix_len, last_node


def inc_lock_ref_around(original, cache, node):
    """AROUND hook on ``RadixCache.inc_lock_ref(node)``: nodes locked now move live slots to protected."""
    if cache.disable or not STATE.enabled:
        return original(cache, node)
    newly_locked = sum(holes_of(cache, n) for n in _path_to_root(cache, node) if n.lock_ref == 0)
    result = original(cache, node)
    cache.evictable_size_ += newly_locked
    cache.protected_size_ -= newly_locked
    if result.delta is not None:
        result.delta += newly_locked
    return result


def dec_lock_ref_around(original, cache, node, *args, **kwargs):
    """AROUND hook on ``RadixCache.dec_lock_ref(node, params=None)``: nodes unlocked now move live slots back."""
    if cache.disable or not STATE.enabled:
        return original(cache, node, *args, **kwargs)
    newly_unlocked = sum(holes_of(cache, n) for n in _path_to_root(cache, node) if n.lock_ref == 1)
    result = original(cache, node, *args, **kwargs)
    cache.evictable_size_ -= newly_unlocked
    cache.protected_size_ += newly_unlocked
    if result.delta is not None:
        result.delta -= newly_unlocked
    return result


def delete_leaf_around(original, cache, node):
    """AROUND hook on ``RadixCache._delete_leaf(node)``: only the leaf's live slots leave ``evictable_size_``."""
    original(cache, node)
    if STATE.enabled:
        cache.evictable_size_ += holes_of(cache, node)


def evict_around(original, cache, params):
    """AROUND hook on ``RadixCache.evict(params)``: frees ``params.num_tokens`` live slots, not logical tokens
    (with a layered allocator: ``num_tokens x G`` group-slots, and reports the group-slots freed ``// G``).

    Each pass of SGLang's evict deletes at least one leaf while one is evictable, so the loop ends.
    """
    if cache.disable or not STATE.enabled:
        return original(cache, params)
    groups = group_count(cache)
    target = params.num_tokens * groups
    start = cache.evictable_size_
    result = original(cache, params)
    # _delete_leaf (hooked) lowers evictable_size_ by exactly the KV units freed
    while start - cache.evictable_size_ < target and result.num_tokens_evicted > 0:
        missing = -(-(target - (start - cache.evictable_size_)) // groups)
        result = original(cache, dataclasses.replace(params, num_tokens=missing))
    return dataclasses.replace(result, num_tokens_evicted=(start - cache.evictable_size_) // groups)


def live_total_size(cache) -> int:
    """REPLACE of ``RadixCache.total_size()``: live slots held by the tree (token-equivalents, ``// G``, with a
    layered allocator)."""
    total = 0
    stack = list(cache.root_node.children.values())
    while stack:
        node = stack.pop()
        if node.evicted:
            continue
        total += slots_of(cache, node)
        stack.extend(node.children.values())
    return total // group_count(cache)


def evictable_size_in_tokens(cache) -> int:
    """REPLACE of ``RadixCache.evictable_size()``: ``evictable_size_`` counts KV units (group-slots with a layered
    allocator); the scheduler adds it to ``available_size()``, which is in token-equivalents."""
    return cache.evictable_size_ // group_count(cache)


def protected_size_in_tokens(cache) -> int:
    """REPLACE of ``RadixCache.protected_size()``: as :func:`evictable_size_in_tokens`."""
    return cache.protected_size_ // group_count(cache)


def split_node_after(new_node, cache, key, child, split_len):
    """AFTER hook on ``RadixCache._split_node(key, child, split_len) -> new_node``: with a layered allocator both
    halves count their group-slots now, while they are live (:func:`slots_of`)."""
    if hasattr(child, LAYERED_SLOTS):
        for node in (new_node, child):
            setattr(node, LAYERED_SLOTS, cache.token_to_kv_pool_allocator.group_slots_of(node.value))
    return new_node


# ---- sliding-window models -------------------------------------------------------------------------------------

def match_prefix_around(original, cache, params):
    """AROUND hook on ``RadixCache.match_prefix(params)``: a request's match ends where its last
    ``STATE.protected_recent`` entries hold no hole."""
    result = original(cache, params)
    tail = STATE.protected_recent
    if not STATE.enabled or not tail or params.req is None:
        return result
    usable = whole_tail_prefix(window_view(cache, result.device_indices), tail)
    if usable == len(result.device_indices):
        return result
    from sglang.srt.mem_cache.radix_cache import RadixKey

    key = params.key
    # holes are whole pages, so a prefix ending at a hole is page aligned
    limited = RadixKey(key.token_ids, key.extra_key, is_bigram=key.is_bigram, limit=usable)
    return original(cache, dataclasses.replace(params, key=limited))


def tree_holes_in_tail(cache, req) -> bool:
    """Whether inserting ``req`` (SGLang's ``Req``) would put the tree's holes into its last
    ``STATE.protected_recent`` positions: the tree holds another request's evicted tokens where ``req``, its match
    cut by :func:`match_prefix_around`, computed its own."""
    tail = STATE.protected_recent
    if not STATE.enabled or not tail:
        return False
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    fill = req.get_fill_ids()
    values = cache.match_prefix(MatchPrefixParams(key=RadixKey(fill, req.extra_key))).device_indices
    start = max(req.cache_protected_len, len(fill) - tail)
    return bool((window_view(cache, values[start:]) == HOLE).any())


def window_view(cache, values):
    """Tree ``values [n]`` as a sliding-window layer sees them: with a layered allocator (``--kv-evict-granularity
    per_layer``) a token some layer group dropped is a hole too, since a group of sliding-window layers keeps only
    each prompt's tail (``sgl_evict.engine.group_keep.layout_keep_masks``); otherwise ``values`` itself."""
    allocator = cache.token_to_kv_pool_allocator
    if not hasattr(allocator, "live_groups"):
        return values
    return values.masked_fill(~allocator.live_groups(values).all(0), HOLE)


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
