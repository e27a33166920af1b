"""The evicting radix tree whose holes may have a copy in host memory (issue 25: reversible eviction).

Built instead of :class:`~sgl_evict.engine.hole_radix_cache.HoleAwareRadixCache` when the server has a host pool
(``--kv-evict-host-pool-gb``). It owns host slots the way SGLang's tree owns device slots:

- **A request** whose config says ``history: "restore"`` copies its own dropped tokens' K and V to the host before
  their device slots are freed (:meth:`offload`); the host slots are the request's (``req`` attribute
  :data:`HOST_ROW`, one entry per position, -1 where none) until its prompt is inserted.
- **A tree node** gets, at insert, the request's host slots of the positions it covers (node attribute
  :data:`HOST_SLOTS`); a split slices them, deleting the leaf (radix eviction) frees them, ``reset``
  (``/flush_cache``) frees them all. Host slots of positions another request inserted first are freed, as SGLang
  frees duplicate device slots.
- **Host memory has its own budget**: when it is full, unlocked nodes' copies go, least recently used first
  (:meth:`drop_host_copies`). That only turns a recoverable hole into a plain one: quality, never correctness.
- **Restored tokens** (:mod:`sgl_evict.engine.restore`) get device slots the request owns (``req`` attribute
  :data:`RESTORED`), freed when it leaves (finish, retract, abort all pass ``cache_finished_req``). Shared nodes'
  values never change: other sessions match them. A finishing request leaves the positions it had restored on
  the leaf it inserts (:data:`CARRY`), and the next turn through that leaf restores them before its prefill, so
  its first token already sees them (the harness's ``reversible-carry``).
"""

from __future__ import annotations

import logging

import torch

from sgl_evict.engine.hole_radix_cache import HoleAwareRadixCache
from sgl_evict.engine.host_kv_pool import HostKVPool
from sgl_evict.holes import HOLE

logger = logging.getLogger("sgl_evict")

#: TreeNode attribute: ``[len(node.key)]`` int64 host slots of the node's holes (-1: no host copy), or absent
HOST_SLOTS = "sgl_evict_host_slots"
#: Req attribute: ``[n]`` int64 host slots of the request's own evicted positions (-1 elsewhere), until inserted
HOST_ROW = "sgl_evict_host_row"
#: Req attribute: ``(positions [m], device slots [m])`` int64 of the tokens restored into the request's row
RESTORED = "sgl_evict_restored"
#: TreeNode attribute: ``[m]`` int64 positions (before the node) the request that inserted it had restored and
#: kept: the next turn through the node brings them back before its prefill
CARRY = "sgl_evict_carry"
NO_HOST = -1


class ReversibleRadixCache(HoleAwareRadixCache):
    """:class:`HoleAwareRadixCache` whose nodes and requests own host copies of evicted tokens.

    Args:
        params: SGLang's ``CacheInitParams``.
        host_pool: where the copies live (:class:`~sgl_evict.engine.host_kv_pool.HostKVPool`).
    """

    def __init__(self, params, host_pool: HostKVPool):
        self.host_pool = host_pool
        self._insert_row = None  # during a request's insert: its HOST_ROW, which new leaves take from
        self._last_inserted = None  # during a request's insert: the node it ended at (None: nothing inserted)
        self._host_nodes: set = set()  # nodes with host copies: what the LRU picks from, without a tree walk
        super().__init__(params)

    @property
    def device_pool(self):
        return self.token_to_kv_pool_allocator.get_kvcache()

    # ---- a request's evicted tokens ----

    def offload(self, req, positions: torch.Tensor, slots: torch.Tensor, seq_len: int,
                priority: torch.Tensor | None = None) -> int:
        """Copies the K and V of ``req``'s dropped tokens at ``positions [n]`` (device ``slots [n]``, still live)
        to host memory and records them in the request's :data:`HOST_ROW` (``[seq_len]``). When host memory is
        short, least recently used tree copies go first, then only the best ``priority [n]`` tokens that fit are
        copied (the first ones without ``priority``). Returns tokens copied."""
        n = positions.numel()
        if n == 0:
            return 0
        if self.host_pool.available_size() < n:
            self.drop_host_copies(n - self.host_pool.available_size())
        fit = min(n, self.host_pool.available_size())
        if fit < n:
            chosen = torch.arange(n) if priority is None else priority.float().cpu().argsort(descending=True)
            chosen = chosen[:fit].sort().values.to(positions.device)
            logger.warning("sgl-evict: host KV pool full: request %s keeps host copies of %d of its %d evicted "
                           "tokens", req.rid, fit, n)
            positions, slots = positions[chosen], slots[chosen]
        if fit == 0:
            return 0
        host = self.host_pool.alloc(fit)
        self.host_pool.save(self.device_pool, slots, host)
        row = getattr(req, HOST_ROW, None)
        if row is None or row.numel() < seq_len:
            grown = torch.full((seq_len,), NO_HOST, dtype=torch.int64)
            if row is not None:
                grown[:row.numel()] = row
            row = grown
        row[positions.cpu()] = host
        setattr(req, HOST_ROW, row)
        return fit

    def release_request_host(self, req) -> None:
        """Frees the host slots ``req`` still owns (its positions no insert took)."""
        row = getattr(req, HOST_ROW, None)
        if row is not None:
            self.host_pool.free(row)
            setattr(req, HOST_ROW, None)

    # ---- restored tokens ----

    def record_restored(self, req, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """``req`` now owns device ``slots [m]`` at ``positions [m]`` of its row (restored from host)."""
        old = getattr(req, RESTORED, None)
        if old is not None:
            positions, slots = torch.cat((old[0], positions.cpu())), torch.cat((old[1], slots))
        setattr(req, RESTORED, (positions.cpu(), slots))

    def has_restored(self, req) -> bool:
        return getattr(req, RESTORED, None) is not None

    def release_restored(self, req) -> None:
        """Frees the device slots ``req`` restored, and turns their positions in its row back into holes."""
        restored = getattr(req, RESTORED, None)
        if restored is None:
            return
        positions, slots = restored
        setattr(req, RESTORED, None)
        if req.req_pool_idx is not None:
            row = self.req_to_token_pool.req_to_token[req.req_pool_idx]
            row[positions.to(row.device)] = HOLE
        self.token_to_kv_pool_allocator.free(slots)

    # ---- the tree's host slots ----

    def cache_unfinished_req(self, req, *args, **kwargs):
        """The request's host slots go to the nodes its insert adds; the rest (duplicates) are freed. A request
        that keeps its prompt (laq pending, holes in its tail) keeps them too."""
        if self._insert_request(req, super().cache_unfinished_req, req, *args, **kwargs) is not None:
            self.release_request_host(req)

    def cache_finished_req(self, req, *args, **kwargs):
        """Restored slots are freed first (the tree never takes them), their positions left on the inserted leaf
        for the next turn (:data:`CARRY`); host slots as in :meth:`cache_unfinished_req`, all of them freed when
        nothing is inserted (retract, abort)."""
        restored = getattr(req, RESTORED, None)
        self.release_restored(req)
        leaf = self._insert_request(req, super().cache_finished_req, req, *args, **kwargs)
        if restored is not None and leaf is not None and leaf is not self.root_node:
            setattr(leaf, CARRY, restored[0].clone())
        self.release_request_host(req)

    def _insert_request(self, req, method, *args, **kwargs):
        """Runs SGLang's ``method`` with ``req``'s host row as what its insert attaches; returns the node the insert
        ended at, or None when it inserted nothing."""
        self._insert_row, self._last_inserted = getattr(req, HOST_ROW, None), None
        try:
            method(*args, **kwargs)
            return self._last_inserted
        finally:
            self._insert_row, self._last_inserted = None, None

    def insert(self, params):
        result = super().insert(params)
        self._last_inserted = result.last_device_node
        return result

    def _insert_helper(self, node, key, value, *args, **kwargs):
        """A new leaf takes the inserting request's host slots of the positions it covers."""
        end = len(key)
        prefix_len, last_node = super()._insert_helper(node, key, value, *args, **kwargs)
        row = self._insert_row
        if row is not None and prefix_len < end:
            start = end - len(last_node.key)
            taken = torch.full((end - start,), NO_HOST, dtype=torch.int64)
            held = row[start:end]  # the row ends at the prompt; decoded tokens have no copies
            taken[:held.numel()] = held
            if (taken != NO_HOST).any():
                setattr(last_node, HOST_SLOTS, taken)
                self._host_nodes.add(last_node)
                held.fill_(NO_HOST)
        return prefix_len, last_node

    def _split_node(self, key, child, split_len):
        new_node = super()._split_node(key, child, split_len)
        host = getattr(child, HOST_SLOTS, None)
        if host is not None:
            setattr(new_node, HOST_SLOTS, host[:split_len].clone())
            setattr(child, HOST_SLOTS, host[split_len:].clone())
            self._host_nodes.add(new_node)
        carry = getattr(child, CARRY, None)
        if carry is not None:  # positions before both halves: a turn through either brings them back
            setattr(new_node, CARRY, carry.clone())
        return new_node

    def _delete_leaf(self, node):
        super()._delete_leaf(node)
        self._drop_node_copies(node)

    def _drop_node_copies(self, node) -> int:
        host = getattr(node, HOST_SLOTS, None)
        if host is None:
            return 0
        setattr(node, HOST_SLOTS, None)
        self._host_nodes.discard(node)
        self.host_pool.free(host)
        return int((host != NO_HOST).sum())

    def reset(self):
        """``/flush_cache`` (and weight updates): every host copy goes with the tree."""
        super().reset()
        if hasattr(self, "host_pool"):  # RadixCache.__init__ resets before our fields exist
            self.host_pool.clear()
            self._host_nodes.clear()

    def drop_host_copies(self, n: int) -> int:
        """Frees at least ``n`` host slots, if it can, from unlocked nodes' copies, least recently used node
        first; returns host slots freed."""
        nodes = sorted((node for node in self._host_nodes if node.lock_ref == 0),
                       key=lambda node: node.last_access_time)
        freed = 0
        for node in nodes:
            if freed >= n:
                break
            freed += self._drop_node_copies(node)
        return freed

    def nodes(self):
        """Every node of the tree but the root."""
        stack = list(self.root_node.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def host_slots_of_prefix(self, req) -> torch.Tensor | None:
        """``[req.cache_protected_len]`` int64 host slots of the prefix ``req`` matched (-1 where a token has no
        host copy), read along its locked path from ``req.last_node`` up; None when that path is not its prefix."""
        parts = []
        node = req.last_node
        while node is not None and node is not self.root_node:
            host = getattr(node, HOST_SLOTS, None)
            parts.append(host if host is not None else torch.full((len(node.key),), NO_HOST, dtype=torch.int64))
            node = node.parent
        slots = torch.cat(parts[::-1]) if parts else torch.empty(0, dtype=torch.int64)
        return slots if slots.numel() == req.cache_protected_len else None

    def carried_positions(self, req) -> torch.Tensor:
        """``[m]`` int64 positions the last turn along ``req``'s matched path had restored and kept (the deepest
        :data:`CARRY`: it holds what that turn kept of the earlier turns' too), below ``cache_protected_len``."""
        node = req.last_node
        while node is not None and node is not self.root_node:
            carry = getattr(node, CARRY, None)
            if carry is not None:
                return carry[carry < req.cache_protected_len]
            node = node.parent
        return torch.empty(0, dtype=torch.int64)

    def drop_restored(self, req, keep: torch.Tensor) -> int:
        """Frees the restored slots of ``req`` whose positions ``keep [seq_len]`` (bool) drops, and turns those
        positions back into holes; returns slots freed."""
        restored = getattr(req, RESTORED, None)
        if restored is None:
            return 0
        positions, slots = restored
        dropped = ~keep.cpu()[positions]
        if not bool(dropped.any()):
            return 0
        row = self.req_to_token_pool.req_to_token[req.req_pool_idx]
        row[positions[dropped].to(row.device)] = HOLE
        self.token_to_kv_pool_allocator.free(slots[dropped.to(slots.device)])
        setattr(req, RESTORED, (positions[~dropped], slots[~dropped.to(slots.device)]) if not dropped.all() else None)
        return int(dropped.sum())

    def host_slots_held(self) -> int:
        """Host slots the tree's nodes hold (for checks)."""
        return sum(int((getattr(node, HOST_SLOTS) != NO_HOST).sum()) for node in self._host_nodes)
