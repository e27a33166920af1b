"""Logical slot ids -> group-slots of one layer group, for writes and for attention's read lists (issue 9's
layered pool, docs/design.md "Per-layer budgets: a layered KV pool", section 2).

``group_map`` is :class:`~sgl_evict.engine.layered_allocator.LayeredTokenToKVPoolAllocator`'s
``[num_groups, size_logical + 2]`` int32 table: ``group_map[g, s]`` is logical slot ``s``'s group-slot in group
``g``, 0 where the group dropped the token, -1 at ``HOLE``. Only entries > 0 are live.

SGLang's attention backends build one flat read list per forward from the request rows (``kv_indptr [bs + 1]``,
``kv_indices [kv_indptr[bs]]``, logical slots in the layered pool). Group ``g``'s layers must read the group's
group-slots and must not see the tokens the group dropped (a padding slot in the list would add a key to the
softmax), so each group gets its own compacted list. PyTorch, for eager forwards (it syncs once for the total
length); decode CUDA graphs build the same lists on the device with no host, one group at a time
(``kernels/group_indices.py``, design step 5).
"""

from __future__ import annotations

import torch


def translate_kv_indices(group_map: torch.Tensor, group: int, kv_indices: torch.Tensor) -> torch.Tensor:
    """``[n]`` logical slots -> ``[n]`` their group-slots in ``group`` (0: dropped there, -1: a hole), in the dtype
    of ``kv_indices``. Exact where every token is live in the group (write locations: new tokens always are)."""
    return group_map[group, kv_indices.to(torch.int64)].to(kv_indices.dtype)


def group_kv_indices(group_map: torch.Tensor, kv_indptr: torch.Tensor,
                     kv_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group read lists of a batch, each leaving out what its group dropped, in one flat buffer.

    Args:
        group_map: ``[num_groups, size_logical + 2]`` int32.
        kv_indptr: ``[bs + 1]`` request offsets into ``kv_indices`` (SGLang's, from 0).
        kv_indices: ``[>= kv_indptr[bs]]`` logical slots (SGLang may over-allocate the buffer).

    Returns:
        ``group_indptr [num_groups, bs + 1]`` int32 and ``group_indices [total]`` int64: group ``g``'s live
        group-slots of request ``b`` are ``group_indices[group_indptr[g, b]:group_indptr[g, b + 1]]``, in the
        order of the logical list. Row ``g`` carries the group's base offset in the flat buffer, so
        ``(group_indptr[g], group_indices)`` is a read list SGLang's Triton kernels take as it is.
    """
    num_groups, bs = group_map.shape[0], kv_indptr.numel() - 1
    n = int(kv_indptr[bs])
    translated = group_map[:, kv_indices[:n].to(torch.int64)]  # [G, n]
    live = translated > 0
    request = torch.repeat_interleave(torch.arange(bs, device=kv_indptr.device), kv_indptr.diff(), output_size=n)
    counts = torch.zeros(num_groups, bs, dtype=torch.int64, device=kv_indptr.device)
    counts.index_add_(1, request, live.to(torch.int64))
    ends = torch.cumsum(counts.flatten(), 0).view(num_groups, bs)  # group-major: group g follows group g - 1
    group_indptr = torch.zeros(num_groups, bs + 1, dtype=torch.int32, device=kv_indptr.device)
    group_indptr[:, 1:] = ends
    if bs:
        group_indptr[1:, 0] = ends[:-1, -1]
    return group_indptr, translated[live].to(torch.int64)
