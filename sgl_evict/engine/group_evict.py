"""Per-group keep masks applied to a request's logical row in a layered pool (issue 9; called after
prefill by ``sgl_evict.engine.evict_batch`` with ``--kv-evict-granularity per_layer``).

The layered counterpart of :func:`sgl_evict.engine.apply.evict_from_row`: a token dropped by some groups loses
those groups' group-slots (``LayeredTokenToKVPoolAllocator.free_group_slots``) and keeps its logical slot; a token
no group keeps any more becomes :data:`sgl_evict.holes.HOLE` in the row and its logical slot is freed. The row
stays logical, so ``seq_lens``, prefix lengths and RoPE positions do not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sgl_evict.holes import HOLE, is_live


@dataclass
class GroupEviction:
    """What :func:`evict_groups` did to one row.

    Attributes:
        row: ``[seq_len]`` the new row (same dtype), with holes where no group keeps the token.
        group_slots_freed: group-slots returned to the heap.
        logical_freed: logical slots returned (tokens owned by the request that no group keeps).
    """

    row: torch.Tensor
    group_slots_freed: int
    logical_freed: int


def evict_groups(allocator, row: torch.Tensor, keep: torch.Tensor, owned_from: int) -> GroupEviction:
    """Applies ``keep [num_groups, seq_len]`` bool to a request's row ``[seq_len]`` (logical slots, holes allowed).

    Positions from ``owned_from`` on are the request's own: their dropped group-slots are freed, and those left
    with no group become holes with their logical slot freed. Positions before it belong to the radix tree, whose
    table entries other requests read: nothing there is freed, and a token is hidden (a hole in this row only)
    when every group drops it; in the groups that keep some of it the request still sees the tree's group-slots
    (design: "Eviction", the first version has no per-request per-group hides).
    ``allocator``: a :class:`sgl_evict.engine.layered_allocator.LayeredTokenToKVPoolAllocator`.
    """
    seq_len = row.shape[0]
    if keep.shape != (allocator.num_groups, seq_len):
        raise ValueError(f"keep must be [{allocator.num_groups}, {seq_len}], got {tuple(keep.shape)}")
    live = is_live(row)
    owned = (torch.arange(seq_len, device=row.device) >= owned_from) & live
    freed = allocator.free_group_slots(row[owned], ~keep[:, owned])
    dead = owned & ~allocator.live_groups(row).any(0)
    logical = row[dead]
    allocator.free(logical)
    hidden = ~owned & live & ~keep.any(0)
    new_row = row.clone()
    new_row[dead | hidden] = HOLE
    return GroupEviction(new_row, freed, int(logical.numel()))
