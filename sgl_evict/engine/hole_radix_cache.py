"""SGLang 0.5.17's radix (prefix) cache over KV index rows with holes: the tree an evicting server builds.

A request's ``req_to_token`` row stays logical; an evicted token's entry is :data:`sgl_evict.holes.HOLE` (-1) and
its slot goes back to the allocator. Tree values (``TreeNode.value``, copies of such rows) keep the holes, so
``match_prefix`` still returns one entry per matched token (the scheduler's prefix length stays logical) and
``_split_node`` keeps every hole at its position. SGLang counts a node's memory as ``len(node.key)``, and the
scheduler admits requests against ``available_size() + evictable_size()``: counting holes as memory would
over-admit, i.e. run out of KV. :class:`HoleAwareRadixCache` counts live slots instead, in every place SGLang
counts (insert, lock, unlock, delete, evict, total), and cuts a match whose tail a sliding-window layer would read
with holes.

SGLang builds it through its radix-cache registry (``--radix-cache-backend sgl-evict``, which the plugin sets for
every evicting server: :func:`build`). The allocators' free paths and the request namespace stay hooks
(``sgl_evict/patches/radix_cache.py``): they are not the tree's.

Layered pool (``sgl_evict.engine.layered_allocator``, ``--kv-evict-granularity per_layer``): tree values stay
logical slots, but a node's memory is its live group-slots (up to G per token). The counters
(``evictable_size_``, ``protected_size_``, lock deltas) then count group-slots, ``evict(n)`` frees ``n x G`` of
them, and what the scheduler reads is in token-equivalents (``// G``). With a plain allocator G is 1.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

from sgl_evict.config import RADIX_CACHE_BACKEND as BACKEND
from sgl_evict.engine.runtime import STATE
from sgl_evict.holes import HOLE, count_live, whole_tail_prefix

#: TreeNode attribute: the node's live group-slots under a layered allocator (:meth:`HoleAwareRadixCache.slots_of`)
LAYERED_SLOTS = "sgl_evict_group_slots"


class HoleAwareRadixCache(RadixCache):
    """SGLang's ``RadixCache`` whose counters hold live KV units (slots, or group-slots with a layered allocator)
    rather than tokens, and whose request matches end where a sliding-window layer's tail is whole."""

    # ---- what a node holds ----

    @property
    def groups(self) -> int:
        """KV units a new token takes: 1, or G with a layered allocator."""
        return getattr(self.token_to_kv_pool_allocator, "num_groups", 1)

    def slots_of(self, node) -> int:
        """KV units a tree node holds: its live slots, or with a layered allocator its live group-slots.

        A node's group-slots are counted while they are live (insert, :meth:`_split_node`) and kept on the node:
        ``evict`` frees a leaf's slots before ``_delete_leaf``, when the table no longer shows them. The count
        cannot change in between: per group, only the slots a request owns are dropped, never the tree's.
        """
        allocator = self.token_to_kv_pool_allocator
        if not hasattr(allocator, "group_slots_of"):
            return count_live(node.value)
        if not hasattr(node, LAYERED_SLOTS):
            setattr(node, LAYERED_SLOTS, allocator.group_slots_of(node.value))
        return getattr(node, LAYERED_SLOTS)

    def holes_of(self, node) -> int:
        """What SGLang's count of a node (``len(node.key)``) exceeds its KV units by; negative with a layered
        allocator, where a token live in every group holds G group-slots."""
        return len(node.key) - self.slots_of(node)

    def _path_to_root(self, node):
        """The nodes from ``node`` up to (not including) the root: what lock-ref changes walk."""
        while node is not self.root_node:
            yield node
            node = node.parent

    # ---- counting ----

    def _insert_helper(self, node, key, value, *args, **kwargs):
        """A new leaf counts its live slots as evictable."""
        before = self.evictable_size_
        prefix_len, last_node = super()._insert_helper(node, key, value, *args, **kwargs)
        # evictable_size_ changes here only when a leaf is added, and then that leaf is the returned node
        if self.evictable_size_ != before:
            self.evictable_size_ -= self.holes_of(last_node)
        return prefix_len, last_node

    def inc_lock_ref(self, node):
        """Nodes locked now move their live slots to protected, and the returned delta says so."""
        if self.disable:
            return super().inc_lock_ref(node)
        newly_locked = sum(self.holes_of(n) for n in self._path_to_root(node) if n.lock_ref == 0)
        result = super().inc_lock_ref(node)
        self.evictable_size_ += newly_locked
        self.protected_size_ -= newly_locked
        if result.delta is not None:
            result.delta += newly_locked
        return result

    def dec_lock_ref(self, node, *args, **kwargs):
        """Nodes unlocked now move their live slots back to evictable."""
        if self.disable:
            return super().dec_lock_ref(node, *args, **kwargs)
        newly_unlocked = sum(self.holes_of(n) for n in self._path_to_root(node) if n.lock_ref == 1)
        result = super().dec_lock_ref(node, *args, **kwargs)
        self.evictable_size_ -= newly_unlocked
        self.protected_size_ += newly_unlocked
        if result.delta is not None:
            result.delta -= newly_unlocked
        return result

    def _delete_leaf(self, node):
        """Only the leaf's live slots leave ``evictable_size_``."""
        super()._delete_leaf(node)
        self.evictable_size_ += self.holes_of(node)

    def evict(self, params):
        """Frees ``params.num_tokens`` live slots (``num_tokens x G`` group-slots with a layered allocator), not
        logical tokens, and reports the slots freed (``// G``). SGLang's evict stops after ``num_tokens`` logical
        tokens, which with holes can free fewer slots than asked; it is repeated until enough are free or nothing
        is evictable (each pass deletes at least one leaf while one is evictable, so the loop ends)."""
        if self.disable:
            return super().evict(params)
        groups = self.groups
        target = params.num_tokens * groups
        start = self.evictable_size_
        result = super().evict(params)
        # _delete_leaf lowers evictable_size_ by exactly the KV units freed
        while start - self.evictable_size_ < target and result.num_tokens_evicted > 0:
            missing = -(-(target - (start - self.evictable_size_)) // groups)
            result = super().evict(dataclasses.replace(params, num_tokens=missing))
        return dataclasses.replace(result, num_tokens_evicted=(start - self.evictable_size_) // groups)

    def total_size(self) -> int:
        """Live slots held by the tree (token-equivalents, ``// G``, with a layered allocator)."""
        total = 0
        stack = list(self.root_node.children.values())
        while stack:
            node = stack.pop()
            if node.evicted:
                continue
            total += self.slots_of(node)
            stack.extend(node.children.values())
        return total // self.groups

    def evictable_size(self) -> int:
        """``evictable_size_`` counts KV units; the scheduler adds this to ``available_size()``, in tokens."""
        return self.evictable_size_ // self.groups

    def protected_size(self) -> int:
        """As :meth:`evictable_size`."""
        return self.protected_size_ // self.groups

    def _split_node(self, key, child, split_len):
        """With a layered allocator both halves count their group-slots now, while they are live."""
        new_node = super()._split_node(key, child, split_len)
        if hasattr(child, LAYERED_SLOTS):
            allocator = self.token_to_kv_pool_allocator
            for node in (new_node, child):
                setattr(node, LAYERED_SLOTS, allocator.group_slots_of(node.value))
        return new_node

    # ---- requests that keep their prompt at prefill end ----

    def cache_unfinished_req(self, req, *args, **kwargs):
        """At prefill end SGLang inserts the prompt into the tree, which then owns its slots. A pending laq request
        (:mod:`sgl_evict.engine.lookahead`: it evicts after its lookahead steps, when the tree could only hide
        those slots) keeps its prompt instead, as SGLang's ``ChunkCache`` does (``prefix_indices`` = its own row;
        ``cache_protected_len`` and ``last_node`` stay those of its matched prefix): its ``cache_finished_req``
        inserts the row, holes and all, and frees what it owns. So does a request whose insert would write the
        tree's holes over the tail it computed itself (:meth:`holes_in_tail`)."""
        if not STATE.enabled or (STATE.pending_of(req) is None and not self.holes_in_tail(req)):
            return super().cache_unfinished_req(req, *args, **kwargs)
        row = self.req_to_token_pool.req_to_token[req.req_pool_idx, : len(req.get_fill_ids())]
        req.prefix_indices = row.to(dtype=torch.int64, copy=True)

    # ---- sliding-window models ----

    def match_prefix(self, params):
        """A request's match (``params.req`` set, as ``Req.init_next_round_input`` passes it) may end inside
        another request's evicted region, with holes among its last ``STATE.protected_recent`` entries, which a
        sliding-window layer reads (the engine keeps every evicted prompt's tail whole: docs/plugin.md). It is cut
        to the longest prefix whose tail is whole (``RadixKey.limit``) and the request computes the rest itself.
        SGLang's own re-matches (``cache_unfinished_req``, no ``req``) are left alone: they must return the whole
        inserted key."""
        result = super().match_prefix(params)
        tail = STATE.protected_recent
        if not STATE.enabled or not tail or params.req is None:
            return result
        usable = whole_tail_prefix(self.window_view(result.device_indices), tail)
        if usable == len(result.device_indices):
            return result
        key = params.key
        # holes are whole pages, so a prefix ending at a hole is page aligned
        limited = RadixKey(key.token_ids, key.extra_key, is_bigram=key.is_bigram, limit=usable)
        return super().match_prefix(dataclasses.replace(params, key=limited))

    def window_view(self, values):
        """Tree ``values [n]`` as a sliding-window layer sees them: with a layered allocator a token some layer
        group dropped is a hole too, since a group of sliding-window layers keeps only each prompt's tail
        (``sgl_evict.engine.group_keep.layout_keep_masks``); otherwise ``values`` itself."""
        allocator = self.token_to_kv_pool_allocator
        if not hasattr(allocator, "live_groups"):
            return values
        return values.masked_fill(~allocator.live_groups(values).all(0), HOLE)

    def holes_in_tail(self, req) -> bool:
        """Whether inserting ``req`` (SGLang's ``Req``) would put the tree's holes into its last
        ``STATE.protected_recent`` positions: the tree holds another request's evicted tokens where ``req``, its
        match cut by :meth:`match_prefix`, computed its own."""
        tail = STATE.protected_recent
        if not STATE.enabled or not tail:
            return False
        from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams

        fill = req.get_fill_ids()
        values = self.match_prefix(MatchPrefixParams(key=RadixKey(fill, req.extra_key))).device_indices
        start = max(req.cache_protected_len, len(fill) - tail)
        return bool((self.window_view(values[start:]) == HOLE).any())


def build(ctx):
    """SGLang's radix-cache factory for ``--radix-cache-backend sgl-evict`` (``TreeCacheBuildContext`` ->
    cache): the hole-aware tree, or SGLang's own chunk cache where SGLang's default would build one (radix cache
    off with chunked prefill: no tree, no counts to correct; without chunked prefill SGLang builds a disabled
    ``RadixCache``, and this its subclass, whose ``cache_unfinished_req`` still leaves a pending laq request its
    prompt). ValueError naming the flag for a server whose default would be another tree (hierarchical, hybrid,
    LMCache or FlexKV caches), which counts tokens without knowing of holes. With ``--kv-evict-host-pool-gb`` the
    tree keeps host copies of evicted tokens (:class:`~sgl_evict.engine.reversible_radix_cache.ReversibleRadixCache`).
    """
    if ctx.disable_radix_cache and ctx.effective_chunked_prefill_size is not None:
        from sglang.srt.mem_cache.registry import default_radix_cache_factory

        return default_radix_cache_factory(ctx)
    other = [name for name, on in (
        ("--enable-hierarchical-cache", ctx.enable_hierarchical_cache),
        ("hybrid sliding-window memory (--disable-hybrid-swa-memory is off)", ctx.is_hybrid_swa),
        ("a hybrid state-space model", ctx.is_hybrid_ssm),
        ("--enable-lmcache", getattr(ctx.server_args, "enable_lmcache", False)),
        ("--enable-flexkv", getattr(ctx.server_args, "enable_flexkv", False)),
    ) if on]
    if other:
        raise ValueError(f"--radix-cache-backend {BACKEND}: kv eviction runs on SGLang's RadixCache only, not with "
                         f"{', '.join(other)}")
    host_pool_gb = STATE.config.host_pool_gb
    if not host_pool_gb:
        return HoleAwareRadixCache(ctx.params)
    from sgl_evict.engine.host_kv_pool import HostKVPool
    from sgl_evict.engine.reversible_radix_cache import ReversibleRadixCache

    device_pool = ctx.params.token_to_kv_pool_allocator.get_kvcache()
    host_pool = HostKVPool.for_device_pool(device_pool, int(host_pool_gb * 2**30))
    logging.getLogger("sgl_evict").info(
        "sgl-evict: host KV pool of %.1f GiB: evicted K and V of %d tokens (%d bytes each)", host_pool_gb,
        host_pool.capacity, host_pool.bytes_per_token)
    return ReversibleRadixCache(ctx.params, host_pool)
