"""Attention's view of a batch whose logical rows have holes: compacted shadow rows and kept lengths.

SGLang's attention backends read a request's KV slots from ``req_to_token[req_pool_idx, :seq_len]`` (they hold
the pool's tensor itself, also inside CUDA graphs). The scheduler's rows stay logical, with ``HOLE`` entries, so
its bookkeeping and the RoPE positions do not change. Before each forward, :func:`compact_rows` writes every
request's live slots, in order, into its *shadow row* (``req_pool_idx + shadow_offset``, rows the pool was
enlarged by), and :func:`enter_compacted` points the forward batch at those rows with the kept lengths. The
positions of the batch were already computed from the logical lengths.

A laq request between prefill and eviction has no holes yet, only positions its first decode steps must not see
(:mod:`sgl_evict.engine.lookahead`): those are left out of its shadow row the same way, the logical row untouched.
"""

from __future__ import annotations

import torch

from sgl_evict.env import env_setting
from sgl_evict.holes import HOLE


def compact_rows(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                 max_len: int, shadow_offset: int, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Copies each request's live, not hidden slots, in order, to the front of its shadow row.

    Args:
        req_to_token: ``[2 * rows, max_context_len]`` int32 pool table, logical rows then their shadows.
        req_pool_indices: ``[bs]`` logical rows of the batch.
        seq_lens: ``[bs]`` logical lengths.
        max_len: at least ``max(seq_lens)``.
        shadow_offset: shadow row of row ``r`` is ``r + shadow_offset``.
        hidden: ``[bs, max_len]`` bool, positions left out although live; None: none.

    Returns:
        ``[bs]`` kept lengths (live entries among the first ``seq_lens`` of each row), same dtype as ``seq_lens``.
    """
    rows = req_to_token[req_pool_indices, :max_len]
    inside = torch.arange(max_len, device=rows.device) < seq_lens.view(-1, 1)
    live = (rows != HOLE) & inside
    if hidden is not None:
        live &= ~hidden
    # live entry j goes to column (number of live entries before it); the rest go to a spare column
    dest = torch.where(live, torch.cumsum(live, dim=1) - 1, max_len)
    packed = torch.zeros(rows.shape[0], max_len + 1, dtype=rows.dtype, device=rows.device)
    packed.scatter_(1, dest, rows)
    req_to_token[req_pool_indices + shadow_offset, :max_len] = packed[:, :max_len]
    return live.sum(dim=1).to(seq_lens.dtype)


#: fields of SGLang's ForwardBatch that attention reads as lengths and rows (saved, replaced, restored)
_FIELDS = ("req_pool_indices", "seq_lens", "seq_lens_cpu", "seq_lens_sum", "extend_prefix_lens",
           "extend_prefix_lens_cpu")


def enter_compacted(forward_batch, req_to_token: torch.Tensor, shadow_offset: int,
                    views: list[tuple[int, torch.Tensor]] = (), kept_cpu: list[int] | None = None) -> dict | None:
    """Points ``forward_batch`` (SGLang's ``ForwardBatch``) at compacted shadow rows.

    ``views``: ``(batch position, [n] bool visible mask)`` of requests that see only part of their first ``n``
    positions (laq's lookahead steps); later positions stay visible. ``kept_cpu``: the kept lengths, known on the
    host (:mod:`sgl_evict.engine.hole_counts`); None: read back from the device (a host sync).
    ``SGL_EVICT_CHECK_KEPT=1`` reads them back anyway and raises if the two differ (a debug check).

    Returns the replaced logical fields (for :func:`leave_compacted`), or None for an empty batch.
    """
    if forward_batch.batch_size == 0 or forward_batch.seq_lens is None:
        return None
    saved = {name: getattr(forward_batch, name, None) for name in _FIELDS}
    seq_lens_cpu = forward_batch.seq_lens_cpu
    max_len = int(seq_lens_cpu.max()) if seq_lens_cpu is not None else int(forward_batch.seq_lens.max())
    hidden = None
    if views:
        hidden = torch.zeros(forward_batch.batch_size, max_len, dtype=torch.bool, device=req_to_token.device)
        for position, visible in views:
            n = min(visible.shape[0], max_len)
            hidden[position, :n] = ~visible[:n]
    kept = compact_rows(req_to_token, forward_batch.req_pool_indices, forward_batch.seq_lens, max_len,
                        shadow_offset, hidden)
    if kept_cpu is None:
        kept_cpu = kept.cpu()
    else:
        if env_setting("SGL_EVICT_CHECK_KEPT") == "1" and kept.tolist() != list(kept_cpu):
            raise RuntimeError(f"sgl-evict: kept lengths counted on the host {list(kept_cpu)} differ from the "
                               f"rows' {kept.tolist()} (requests {getattr(forward_batch, 'rids', None)})")
        kept_cpu = torch.tensor(kept_cpu, dtype=kept.dtype)
    forward_batch.req_pool_indices = forward_batch.req_pool_indices + shadow_offset
    forward_batch.seq_lens = kept
    if seq_lens_cpu is not None:
        forward_batch.seq_lens_cpu = kept_cpu.to(seq_lens_cpu.dtype)
    forward_batch.seq_lens_sum = int(kept_cpu.sum())
    if forward_batch.forward_mode.is_extend() and forward_batch.extend_seq_lens is not None:
        # new tokens are all live: the kept prefix is what attention sees before them
        forward_batch.extend_prefix_lens = kept - forward_batch.extend_seq_lens.to(kept.dtype)
        if forward_batch.extend_prefix_lens_cpu is not None:
            forward_batch.extend_prefix_lens_cpu = [
                k - e for k, e in zip(kept_cpu.tolist(), forward_batch.extend_seq_lens_cpu)]
    return saved


def leave_compacted(forward_batch, saved: dict | None) -> None:
    """Restores the logical fields :func:`enter_compacted` replaced."""
    if saved is None:
        return
    for name, value in saved.items():
        setattr(forward_batch, name, value)
