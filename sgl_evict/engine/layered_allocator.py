"""``LayeredTokenToKVPoolAllocator``: logical slots backed by one physical slot per layer group (issue 9's layered
pool, docs/design.md "Per-layer budgets: a layered KV pool", section 2; built in the server by
``patches/layered_pool.py`` with ``--kv-evict-granularity per_layer``).

What the scheduler, the radix tree and ``req_to_token`` hold are **logical** slots, handed out by a plain
``TokenToKVPoolAllocator`` over ``size_logical`` ids; a logical slot has no KV behind it. The KV of a token for the
layers of group ``g`` lives in a **group-slot**, taken from one heap shared by all groups (a second
``TokenToKVPoolAllocator`` over ``num_group_slots`` ids), so per-layer budgets that differ by layer and by request
need no per-group sizing. ``group_map[g, logical]`` is the token's group-slot in group ``g``:

- ``group_map``: ``[num_groups, size_logical + page_size + 1]`` int32. 0 means "dropped in this group" (group-slot
  0 is the padding slot, never handed out, as in SGLang's ``full_to_swa_index_mapping``); the last entry is -1 so
  that ``group_map[:, HOLE]`` is -1. Only entries > 0 are live.

Accounting is in **token-equivalents**: a new token takes one logical slot and ``num_groups`` group-slots, so
``available_size() = min(free logical slots, free group-slots // num_groups)``, the number SGLang's scheduler
admits on. page_size 1 only (a per-page table is design step 8).
"""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.allocator.base import BaseTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

from sgl_evict.holes import HOLE, live


class LayeredTokenToKVPoolAllocator(BaseTokenToKVPoolAllocator):
    """SGLang's allocator interface over logical slots, each backed by a group-slot in every layer group.

    Args:
        size_logical: logical slot ids ``1 .. size_logical`` (0 is the padding slot).
        num_group_slots: group-slots of the shared heap, ids ``1 .. num_group_slots``.
        num_groups: layer groups G; a token live in every group costs G group-slots.
        dtype, device, need_sort: as for ``TokenToKVPoolAllocator``.
        kvcache: a :class:`~sgl_evict.engine.layered_kv_pool.LayeredMHATokenToKVPool` (it is given ``group_map``),
            or None for the allocator alone.
    """

    def __init__(self, size_logical: int, num_group_slots: int, num_groups: int, dtype: torch.dtype, device: str,
                 kvcache, need_sort: bool):
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        # size: token-equivalents, what available_size() reports on an empty pool
        super().__init__(min(size_logical, num_group_slots // num_groups), 1, dtype, device, kvcache, need_sort)
        self.num_groups = num_groups
        self.logical = TokenToKVPoolAllocator(size_logical, dtype, device, kvcache, need_sort)
        self.heap = TokenToKVPoolAllocator(num_group_slots, dtype, device, kvcache, need_sort)
        self.group_map = torch.zeros(num_groups, size_logical + self.page_size + 1, dtype=torch.int32, device=device)
        self.group_map[:, -1] = HOLE
        if kvcache is not None:  # the KV pool translates its writes through the same table (as SWA's mapping)
            kvcache.register_group_map(self.group_map)
        self.clear()

    # ---- SGLang's allocator interface ----

    def available_size(self) -> int:
        """Tokens that can be allocated now: limited by logical slots and by whole sets of G group-slots."""
        return min(self.logical.available_size(), self.heap.available_size() // self.num_groups)

    def alloc(self, need_size: int) -> torch.Tensor | None:
        """``[need_size]`` int64 logical slots, each live in every group (prefill and decode write all layers);
        None when the pool cannot hold them."""
        if need_size > self.available_size():
            return None
        logical = self.logical.alloc(need_size)
        group_slots = self.heap.alloc(need_size * self.num_groups)
        self.group_map[:, logical] = group_slots.view(self.num_groups, need_size).to(torch.int32)
        return logical

    def free(self, free_index: torch.Tensor) -> None:
        """Frees logical slots ``free_index [n]`` (holes skipped) and whatever group-slots they still hold.

        Every free path of SGLang (``free_segment``, ``free_segments``, free groups) ends here.
        """
        if free_index.numel() == 0:
            return
        if not self.is_not_in_free_group:
            self.free_group.append(free_index)
            return
        logical = live(free_index).to(torch.int64)
        self._release(self.group_map[:, logical])
        self.group_map[:, logical] = 0
        self.logical.free(logical)

    def clear(self) -> None:
        self.logical.clear()
        self.heap.clear()
        self.group_map[:, :-1] = 0  # the last entry stays -1 (HOLE maps to HOLE)
        self.is_not_in_free_group = True
        self.free_group = []

    def merge_and_sort_free(self) -> None:
        self.logical.merge_and_sort_free()
        self.heap.merge_and_sort_free()

    def resize(self, config) -> None:
        # SGLang's resize sets one token count; the two resources here are sized together at construction
        raise NotImplementedError("LayeredTokenToKVPoolAllocator is sized at construction; resize is not supported")

    def debug_print(self) -> str:
        return (f"#logical-available: {self.logical.available_size()}, "
                f"#group-slots-available: {self.heap.available_size()} ({self.num_groups} groups), ")

    # ---- per-group eviction ----

    def live_groups(self, logical: torch.Tensor) -> torch.Tensor:
        """``[num_groups, n]`` bool: where logical slots ``logical [n]`` (holes allowed) still hold a group-slot."""
        return self.group_map[:, logical.to(torch.int64)] > 0

    def group_slots_of(self, logical: torch.Tensor) -> int:
        """Group-slots held by logical slots ``logical [n]`` (holes hold none): what freeing them would free."""
        return int(self.live_groups(logical).sum())

    def free_group_slots(self, logical: torch.Tensor, drop: torch.Tensor) -> int:
        """Frees the group-slots of ``logical [n]`` where ``drop [num_groups, n]`` is True; the logical slots stay
        allocated (a token dropped in every group is the caller's to turn into a hole and free). Dropping a group
        twice frees nothing the second time. Returns the group-slots freed."""
        index = logical.to(torch.int64)
        held = self.group_map[:, index]
        released = torch.where(drop, held, torch.zeros_like(held))
        self._release(released)
        self.group_map[:, index] = torch.where(drop, torch.zeros_like(held), held)
        return int((released > 0).sum())

    def heap_available_size(self) -> int:
        """Free group-slots (the scheduler's idle check must compare these, not the rounded token-equivalents)."""
        return self.heap.available_size()

    def _release(self, entries: torch.Tensor) -> None:
        """Returns the live group-slots among ``entries`` (any shape of ``group_map`` values) to the heap."""
        self.heap.free(entries[entries > 0].to(torch.int64))
