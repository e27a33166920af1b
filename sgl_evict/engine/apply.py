"""Turns a request's keep mask into holes in its logical slot row and the slots it may free."""

from __future__ import annotations

import torch

from sgl_evict.holes import HOLE, is_live


def evict_from_row(row: torch.Tensor, keep: torch.Tensor, owned_from: int) -> tuple[torch.Tensor, int]:
    """Marks dropped tokens as holes in ``row`` (in place) and returns the slots the request may free.

    Args:
        row: ``[seq_len]`` int32 view of the request's ``req_to_token`` row (logical: entry ``t`` is token ``t``).
        keep: ``[seq_len]`` bool keep mask.
        owned_from: first position whose slot the request owns. Slots before it belong to the radix tree (a
            matched prefix, or chunks it already inserted): they are hidden from this request's attention but
            freed only when the tree drops them.

    Returns:
        ``(slots, hidden)``: ``[n]`` int64 slots to hand back to the allocator (live, dropped, owned), and how
        many dropped tokens were only hidden.
    """
    if keep.shape != row.shape:
        raise ValueError(f"keep mask {tuple(keep.shape)} does not match the row {tuple(row.shape)}")
    dropped = is_live(row) & ~keep
    owned = torch.arange(row.shape[0], device=row.device) >= owned_from
    slots = row[dropped & owned].to(torch.int64)
    hidden = int((dropped & ~owned).sum().item())
    row.masked_fill_(dropped, HOLE)
    return slots, hidden
