"""One layer group's read list of a decode batch, built on the device with no host sync (Triton): the decode CUDA
graphs of the layered KV pool (issue 9, design step 5; :mod:`sgl_evict.engine.layered_attention`).

Group ``g``'s read list of request ``b`` is the request's row ``req_to_token[req_pool_indices[b], :seq_lens[b]]``
(logical slots) translated through ``group_map[g]``, with what the group dropped left out (``group_map[g, s] <= 0``;
a negative row entry, ``HOLE``, is left out too). :func:`sgl_evict.engine.group_kv_indices.group_kv_indices` builds
the same lists in PyTorch but needs the total length on the host; a captured graph has fixed launch shapes and no
host, so here one program per request walks its row in blocks (the loop bound is read on the device):

1. ``_count_live``: the request's live entries;
2. ``kv_indptr[1:] = cumsum(max(count, 1))`` (PyTorch, ``[bs]``);
3. ``_write_live``: the translated live entries at ``kv_indptr[b]`` onwards, placed by a running prefix sum
   (``tl.cumsum``), as ``kernels/selection.py: _compact`` places kept slots.

A request with nothing live in the group reads group-slot 0, the padding slot (one key). Only the padding requests
of a replayed graph get there (SGLang pads a batch with ``req_pool_indices`` 0 and ``seq_lens`` 1: the first entry of
row 0, which the group may have dropped); a real decode request always holds its new token in every group. An empty
list would leave the decode kernel a zero softmax sum: NaN rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# JIT specialisation (see kernels/paged_scoring.py): the row stride is the server's context length, fixed per
# process, and the other pointers are whole static buffers or slices from their start; a group's map row
# ``group_map[g]`` starts ``g x (size_logical + 2) x 4`` bytes in, 16-byte aligned or not depending on g, so it is not
# specialised on alignment (one variant for every group; its loads are gathers anyway).
DO_NOT_SPECIALIZE_ON_ALIGNMENT = ("GroupMap",)
BLOCK = 256


@triton.jit
def _group_slots(ReqToTok, GroupMap, row_start, t, seq_len):
    """Group-slots of row entries ``t`` (``[BLOCK]``; <= 0 where the group holds none, past ``seq_len`` or a hole)."""
    logical = tl.load(ReqToTok + row_start + t, mask=t < seq_len, other=-1)
    return tl.load(GroupMap + logical, mask=logical >= 0, other=0)


@triton.jit(do_not_specialize_on_alignment=DO_NOT_SPECIALIZE_ON_ALIGNMENT)
def _count_live(ReqToTok, ReqPoolIdx, SeqLens, GroupMap, Counts, s_row, BLOCK: tl.constexpr):
    req = tl.program_id(0)
    row = tl.load(ReqPoolIdx + req).to(tl.int64)
    seq_len = tl.load(SeqLens + req)
    live = 0
    for n0 in range(0, seq_len, BLOCK):
        slot = _group_slots(ReqToTok, GroupMap, row * s_row, n0 + tl.arange(0, BLOCK), seq_len)
        live += tl.sum((slot > 0).to(tl.int32), axis=0)
    tl.store(Counts + req, live)


@triton.jit(do_not_specialize_on_alignment=DO_NOT_SPECIALIZE_ON_ALIGNMENT)
def _write_live(ReqToTok, ReqPoolIdx, SeqLens, GroupMap, KvIndptr, KvIndices, s_row, BLOCK: tl.constexpr):
    req = tl.program_id(0)
    row = tl.load(ReqPoolIdx + req).to(tl.int64)
    seq_len = tl.load(SeqLens + req)
    start = tl.load(KvIndptr + req)
    written = 0
    for n0 in range(0, seq_len, BLOCK):
        slot = _group_slots(ReqToTok, GroupMap, row * s_row, n0 + tl.arange(0, BLOCK), seq_len)
        live = slot > 0
        pos = start + written + tl.cumsum(live.to(tl.int32), axis=0) - 1
        tl.store(KvIndices + pos, slot.to(KvIndices.dtype.element_ty), mask=live)
        written += tl.sum(live.to(tl.int32), axis=0)
    first = tl.arange(0, 1)  # the one-element store of "nothing live: the padding slot"
    tl.store(KvIndices + start + first, tl.zeros([1], KvIndices.dtype.element_ty), mask=first + written == 0)


def fill_group_kv_indices(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                          group_map_row: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                          counts: torch.Tensor) -> None:
    """Writes one group's read list of a batch into preallocated buffers; device work only, fixed launch shapes.

    Args:
        req_to_token: ``[rows, context]`` int32 request table (logical slots, ``HOLE`` < 0).
        req_pool_indices: ``[bs]`` rows of the batch.
        seq_lens: ``[bs]`` row lengths read.
        group_map_row: ``[size_logical + 2]`` int32, ``group_map[g]``: group-slot of each logical slot, <= 0 where
            the group holds none.
        kv_indptr: ``[bs + 1]`` int32, written: request ``b`` reads ``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]``.
        kv_indices: ``[>= total]`` int64, written: live group-slots in row order, or ``[0]`` where none is live.
        counts: ``[bs]`` int32 scratch.
    """
    bs = req_pool_indices.shape[0]
    _count_live[(bs,)](req_to_token, req_pool_indices, seq_lens, group_map_row, counts, req_to_token.stride(0),
                       BLOCK=BLOCK)
    kv_indptr[:1].zero_()
    kv_indptr[1:].copy_(torch.cumsum(counts.clamp_min_(1), 0))
    _write_live[(bs,)](req_to_token, req_pool_indices, seq_lens, group_map_row, kv_indptr, kv_indices,
                       req_to_token.stride(0), BLOCK=BLOCK)
