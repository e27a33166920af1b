"""Fused attention scores of observation queries over keys read straight from a paged KV pool.

Computes :func:`sgl_evict.scoring.score_queries` for a batch of requests without gathering the keys
and without writing the ``[num_queries, seq_len]`` probability matrix. Keys are addressed as in
SGLang: ``k_buffer [pool_slots, num_kv_heads, head_dim]`` holds one layer, and token ``t`` of request
``r`` lives in slot ``req_to_token[r, t]`` (any page size: the table is per token).

Three launches (four with pooling), each a grid of ``(num_reqs * num_kv_heads, num_chunks)``:

1. ``_row_stats_kernel``: per key chunk, online softmax row max and row sum (base 2) for every query
   row of the KV head's group (``group * num_queries`` rows in one matrix-unit tile).
2. ``_combine_kernel``: merges the chunks' (max, sum) into each row's log-sum-exp.
3. ``_accumulate_kernel``: re-reads the chunk, ``p = exp2(s - max) / (sum * num_queries)``, sums the
   rows of each query head (mean over queries), multiplies laprox value weights, then reduces the
   GQA group (or writes per-head scores for pooling).
4. ``_pool_reduce_kernel`` (pooling only): max/avg pooling over neighbouring tokens, clipped at the
   request's length like ``F.max_pool1d`` / ``avg_pool1d(count_include_pad=False)``, then the GQA
   reduction.

Queries are cast to the key dtype before the matrix product (as the model's own attention does);
logits and everything after are float32.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from sgl_evict.scoring import score_queries

_NEG = -1.0e30  # finite "minus infinity": exp2(_NEG - _NEG) stays 1, never NaN
_LOG2E = 1.4426950408889634
_GQA_REDUCE = {"mean": 0, "max": 1, "sum": 2}
_POOL_MODE = {"max": 0, "avg": 1}


@triton.jit
def _tile_logits(
    q, k_ptr, rtt_row_ptr, qpos, row_valid, kvh, n0, seq_len, qk_scale,
    stride_k_slot, stride_k_head,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Base-2 logits ``[rows, BLOCK_N]`` of the tile starting at token ``n0``, and their validity."""
    t = n0 + tl.arange(0, BLOCK_N)
    in_seq = t < seq_len
    slot = tl.load(rtt_row_ptr + t, mask=in_seq, other=0).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    k = tl.load(k_ptr + slot[:, None] * stride_k_slot + kvh * stride_k_head + d[None, :], mask=in_seq[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale
    valid = row_valid[:, None] & in_seq[None, :]
    if CAUSAL:
        valid = valid & (t[None, :] <= qpos[:, None])
    return tl.where(valid, s, _NEG), valid


@triton.jit
def _load_queries(
    q_ptr, pos_ptr, req, kvh, num_queries, stride_qr, stride_qh, stride_qq, stride_pr,
    GROUP: tl.constexpr, QUERIES_P: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
):
    """Rows ``g * QUERIES_P + i``: query ``i`` of query head ``kvh * GROUP + g``. Returns q, positions, validity."""
    rows = tl.arange(0, ROWS)
    g = rows // QUERIES_P
    i = rows % QUERIES_P
    row_valid = (g < GROUP) & (i < num_queries)
    d = tl.arange(0, HEAD_DIM)
    qh = kvh * GROUP + g
    q = tl.load(
        q_ptr + req * stride_qr + qh[:, None] * stride_qh + i[:, None] * stride_qq + d[None, :],
        mask=row_valid[:, None], other=0.0,
    )
    if CAUSAL:
        qpos = tl.load(pos_ptr + req * stride_pr + i, mask=i < num_queries, other=-1)
    else:
        qpos = rows
    return q, qpos, row_valid


@triton.jit
def _row_stats_kernel(
    q_ptr, pos_ptr, k_ptr, rtt_ptr, seq_lens_ptr, m_out_ptr, l_out_ptr,
    num_queries, chunk_size, num_chunks, qk_scale,
    stride_qr, stride_qh, stride_qq, stride_pr, stride_k_slot, stride_k_head, stride_rtt,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr, QUERIES_P: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, Q_DOT_DTYPE: tl.constexpr,
):
    ROWS: tl.constexpr = GROUP_P * QUERIES_P
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    req = pid // NUM_KV_HEADS
    kvh = pid % NUM_KV_HEADS
    seq_len = tl.load(seq_lens_ptr + req)
    q, qpos, row_valid = _load_queries(
        q_ptr, pos_ptr, req, kvh, num_queries, stride_qr, stride_qh, stride_qq, stride_pr,
        GROUP, QUERIES_P, ROWS, HEAD_DIM, CAUSAL,
    )
    q = q.to(k_ptr.dtype.element_ty).to(Q_DOT_DTYPE)
    m = tl.full([ROWS], _NEG, tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    start = chunk * chunk_size
    end = tl.minimum(start + chunk_size, seq_len)
    rtt_row = rtt_ptr + req.to(tl.int64) * stride_rtt
    for n0 in range(start, end, BLOCK_N):
        s, valid = _tile_logits(
            q, k_ptr, rtt_row, qpos, row_valid, kvh, n0, seq_len, qk_scale,
            stride_k_slot, stride_k_head, CAUSAL, HEAD_DIM, BLOCK_N,
        )
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.where(valid, tl.exp2(s - m_new[:, None]), 0.0)
        l = l * tl.exp2(m - m_new) + tl.sum(p, 1)
        m = m_new
    offs = (pid * num_chunks + chunk) * ROWS + tl.arange(0, ROWS)
    tl.store(m_out_ptr + offs, m)
    tl.store(l_out_ptr + offs, l)


@triton.jit
def _combine_kernel(
    m_ptr, l_ptr, row_max_ptr, row_weight_ptr, num_chunks, num_queries, ROWS: tl.constexpr,
):
    """Per row: max over chunks, and weight ``1 / (sum * num_queries)`` (0 for padding rows)."""
    pid = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    m = tl.full([ROWS], _NEG, tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    for c in range(0, num_chunks):
        offs = (pid * num_chunks + c) * ROWS + rows
        m_c = tl.load(m_ptr + offs)
        l_c = tl.load(l_ptr + offs)
        m_new = tl.maximum(m, m_c)
        l = l * tl.exp2(m - m_new) + l_c * tl.exp2(m_c - m_new)
        m = m_new
    weight = tl.where(l > 0, 1.0 / (tl.where(l > 0, l, 1.0) * num_queries), 0.0)
    tl.store(row_max_ptr + pid * ROWS + rows, m)
    tl.store(row_weight_ptr + pid * ROWS + rows, weight)


@triton.jit
def _accumulate_kernel(
    q_ptr, pos_ptr, k_ptr, rtt_ptr, seq_lens_ptr, row_max_ptr, row_weight_ptr, vw_ptr, out_ptr,
    num_queries, chunk_size, max_len, qk_scale,
    stride_qr, stride_qh, stride_qq, stride_pr, stride_k_slot, stride_k_head, stride_rtt,
    stride_vwr, stride_vwh, stride_or, stride_oh,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr, QUERIES_P: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, Q_DOT_DTYPE: tl.constexpr, HAS_VW: tl.constexpr, PER_HEAD_OUT: tl.constexpr,
    GQA_REDUCE: tl.constexpr,
):
    ROWS: tl.constexpr = GROUP_P * QUERIES_P
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    req = pid // NUM_KV_HEADS
    kvh = pid % NUM_KV_HEADS
    seq_len = tl.load(seq_lens_ptr + req)
    q, qpos, row_valid = _load_queries(
        q_ptr, pos_ptr, req, kvh, num_queries, stride_qr, stride_qh, stride_qq, stride_pr,
        GROUP, QUERIES_P, ROWS, HEAD_DIM, CAUSAL,
    )
    q = q.to(k_ptr.dtype.element_ty).to(Q_DOT_DTYPE)
    rows = tl.arange(0, ROWS)
    row_max = tl.load(row_max_ptr + pid * ROWS + rows)
    row_weight = tl.load(row_weight_ptr + pid * ROWS + rows)
    g = tl.arange(0, GROUP_P)
    start = chunk * chunk_size
    end = tl.minimum(start + chunk_size, max_len)
    rtt_row = rtt_ptr + req.to(tl.int64) * stride_rtt
    for n0 in range(start, end, BLOCK_N):
        s, valid = _tile_logits(
            q, k_ptr, rtt_row, qpos, row_valid, kvh, n0, seq_len, qk_scale,
            stride_k_slot, stride_k_head, CAUSAL, HEAD_DIM, BLOCK_N,
        )
        p = tl.where(valid, tl.exp2(s - row_max[:, None]), 0.0) * row_weight[:, None]
        per_head = tl.sum(tl.reshape(p, [GROUP_P, QUERIES_P, BLOCK_N]), 1)  # [GROUP_P, BLOCK_N]
        t = n0 + tl.arange(0, BLOCK_N)
        head_ok = (g[:, None] < GROUP) & (t[None, :] < seq_len)
        if HAS_VW:
            vw = tl.load(
                vw_ptr + req * stride_vwr + (kvh * GROUP + g[:, None]) * stride_vwh + t[None, :],
                mask=head_ok, other=0.0,
            )
            per_head = per_head * vw
        in_table = t < max_len
        if PER_HEAD_OUT:
            tl.store(
                out_ptr + req * stride_or + (kvh * GROUP + g[:, None]) * stride_oh + t[None, :],
                per_head, mask=(g[:, None] < GROUP) & in_table[None, :],
            )
        else:
            if GQA_REDUCE == 1:
                reduced = tl.max(tl.where(g[:, None] < GROUP, per_head, _NEG), 0)
            else:
                reduced = tl.sum(per_head, 0)
                if GQA_REDUCE == 0:
                    reduced = reduced / GROUP
            reduced = tl.where(t < seq_len, reduced, 0.0)
            tl.store(out_ptr + req * stride_or + kvh * stride_oh + t, reduced, mask=in_table)


@triton.jit
def _pool_reduce_kernel(
    head_ptr, seq_lens_ptr, out_ptr, max_len,
    stride_hr, stride_hh, stride_or, stride_oh,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, KERNEL: tl.constexpr, POOL_MODE: tl.constexpr,
    GQA_REDUCE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    req = pid // NUM_KV_HEADS
    kvh = pid % NUM_KV_HEADS
    seq_len = tl.load(seq_lens_ptr + req)
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    if GQA_REDUCE == 1:
        reduced = tl.full([BLOCK], _NEG, tl.float32)
    else:
        reduced = tl.zeros([BLOCK], tl.float32)
    for g in tl.static_range(GROUP):
        row = head_ptr + req * stride_hr + (kvh * GROUP + g) * stride_hh
        if POOL_MODE == 0:
            pooled = tl.full([BLOCK], _NEG, tl.float32)
        else:
            pooled = tl.zeros([BLOCK], tl.float32)
        count = tl.zeros([BLOCK], tl.float32)
        for o in tl.static_range(KERNEL):
            idx = t + (o - KERNEL // 2)
            ok = (idx >= 0) & (idx < seq_len)
            v = tl.load(row + idx, mask=ok, other=0.0)
            if POOL_MODE == 0:
                pooled = tl.maximum(pooled, tl.where(ok, v, _NEG))
            else:
                pooled += v
                count += ok.to(tl.float32)
        if POOL_MODE == 1:
            pooled = pooled / tl.maximum(count, 1.0)
        if GQA_REDUCE == 1:
            reduced = tl.maximum(reduced, pooled)
        else:
            reduced += pooled
    if GQA_REDUCE == 0:
        reduced = reduced / GROUP
    reduced = tl.where(t < seq_len, reduced, 0.0)
    tl.store(out_ptr + req * stride_or + kvh * stride_oh + t, reduced, mask=t < max_len)


def _dot_dtype(k_buffer: torch.Tensor):
    """Matrix-product operand type: the key dtype on a GPU; float32 under TRITON_INTERPRET, whose
    half-precision dot is wrong (values rounded to the key dtype first, so results still match)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or k_buffer.dtype == torch.float32:
        return tl.float32
    return tl.bfloat16 if k_buffer.dtype == torch.bfloat16 else tl.float16


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


class PagedScoring:
    """Attention-mass scores of observation queries over a paged key pool (FlashInfer-style plan/run).

    ``plan`` fixes the batch geometry and allocates scratch; ``run`` may then be called once per layer.

    Args:
        num_q_heads, num_kv_heads, head_dim: attention geometry (``head_dim`` a power of two >= 16).
        scaling: logit scale (``head_dim ** -0.5`` for most models).
        pooling_kernel: odd window of :func:`sgl_evict.scoring.pool_scores` (1: no pooling).
        pooling_mode: ``"max"`` or ``"avg"``.
        gqa_reduce: ``"mean"``, ``"max"`` or ``"sum"`` over each GQA group.
        block_n: keys per tile.
    """

    def __init__(
        self, num_q_heads: int, num_kv_heads: int, head_dim: int, scaling: float,
        pooling_kernel: int = 1, pooling_mode: str = "max", gqa_reduce: str = "mean", block_n: int = 64,
    ) -> None:
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        if num_q_heads // num_kv_heads > 32:
            raise ValueError(f"GQA group of {num_q_heads // num_kv_heads} query heads is over the supported 32")
        if head_dim < 16 or head_dim & (head_dim - 1):
            raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
        if pooling_kernel > 1 and pooling_kernel % 2 == 0:
            raise ValueError(f"pooling kernel size must be odd, got {pooling_kernel}")
        if pooling_mode not in _POOL_MODE:
            raise ValueError(f"pooling mode must be 'max' or 'avg', got {pooling_mode!r}")
        if gqa_reduce not in _GQA_REDUCE:
            raise ValueError(f"GQA reduction must be 'mean', 'max' or 'sum', got {gqa_reduce!r}")
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.group = num_q_heads // num_kv_heads
        self.scaling = scaling
        self.pooling_kernel, self.pooling_mode, self.gqa_reduce = pooling_kernel, pooling_mode, gqa_reduce
        self.block_n = block_n
        self._plan: dict | None = None

    def plan(self, num_reqs: int, max_len: int, num_queries: int, device: torch.device | str) -> None:
        """Sizes the key chunks so about four programs run per multiprocessor, and allocates scratch.

        Args:
            num_reqs: requests in the batch.
            max_len: width of ``req_to_token`` (the longest ``seq_len`` the batch may have).
            num_queries: observation queries per query head.
        """
        if num_reqs < 1 or max_len < 1 or num_queries < 1:
            raise ValueError(f"num_reqs, max_len and num_queries must be >= 1, got {num_reqs}, {max_len}, {num_queries}")
        device = torch.device(device)
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        target_chunks = max(1, math.ceil(4 * sms / (num_reqs * self.num_kv_heads)))
        chunk = self.block_n * max(1, math.ceil(max_len / (target_chunks * self.block_n)))
        num_chunks = math.ceil(max_len / chunk)
        queries_p = max(_next_pow2(num_queries), math.ceil(16 / _next_pow2(self.group)))
        rows = _next_pow2(self.group) * queries_p
        slices = num_reqs * self.num_kv_heads
        f32 = dict(dtype=torch.float32, device=device)
        self._plan = dict(
            num_reqs=num_reqs, max_len=max_len, num_queries=num_queries, chunk=chunk, num_chunks=num_chunks,
            queries_p=queries_p, rows=rows,
            chunk_max=torch.empty(slices * num_chunks * rows, **f32),
            chunk_sum=torch.empty(slices * num_chunks * rows, **f32),
            row_max=torch.empty(slices * rows, **f32),
            row_weight=torch.empty(slices * rows, **f32),
            per_head=torch.empty(num_reqs, self.num_q_heads, max_len, **f32) if self.pooling_kernel > 1 else None,
        )

    def run(
        self,
        queries: torch.Tensor,
        k_buffer: torch.Tensor,
        req_to_token: torch.Tensor,
        seq_lens: torch.Tensor,
        query_positions: torch.Tensor | None = None,
        value_weights: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores of one layer.

        Args:
            queries: ``[num_reqs, num_q_heads, num_queries, head_dim]`` post-RoPE observation queries
                (cast to ``k_buffer``'s dtype for the matrix product).
            k_buffer: ``[pool_slots, num_kv_heads, head_dim]`` keys of this layer (bf16, fp16 or fp32).
            req_to_token: ``[num_reqs, max_len]`` int32 slot of each token.
            seq_lens: ``[num_reqs]`` int32/int64 prompt lengths (``<= max_len``).
            query_positions: ``[num_reqs, num_queries]`` positions of queries inside the prompt (causal),
                or ``None`` (every query sees every key).
            value_weights: ``[num_reqs, num_q_heads, max_len]`` float32 laprox weights, or ``None``.
            out: optional ``[num_reqs, num_kv_heads, max_len]`` float32 destination.

        Returns:
            ``[num_reqs, num_kv_heads, max_len]`` float32; entries at ``t >= seq_len`` are 0.
        """
        if self._plan is None:
            raise ValueError("call plan() before run()")
        p = self._plan
        num_reqs, max_len, nq = p["num_reqs"], p["max_len"], p["num_queries"]
        want_q = (num_reqs, self.num_q_heads, nq, self.head_dim)
        if tuple(queries.shape) != want_q:
            raise ValueError(f"queries must be {list(want_q)}, got {list(queries.shape)}")
        if k_buffer.dim() != 3 or k_buffer.shape[1:] != (self.num_kv_heads, self.head_dim) or k_buffer.stride(2) != 1:
            raise ValueError(
                f"k_buffer must be [pool_slots, {self.num_kv_heads}, {self.head_dim}] with contiguous head_dim, "
                f"got {list(k_buffer.shape)}"
            )
        if tuple(req_to_token.shape) != (num_reqs, max_len) or req_to_token.stride(1) != 1:
            raise ValueError(f"req_to_token must be [{num_reqs}, {max_len}] row-contiguous, got {list(req_to_token.shape)}")
        if tuple(seq_lens.shape) != (num_reqs,):
            raise ValueError(f"seq_lens must be [{num_reqs}], got {list(seq_lens.shape)}")
        if query_positions is not None and tuple(query_positions.shape) != (num_reqs, nq):
            raise ValueError(f"query_positions must be [{num_reqs}, {nq}], got {list(query_positions.shape)}")
        if value_weights is not None and (
            tuple(value_weights.shape) != (num_reqs, self.num_q_heads, max_len) or value_weights.stride(2) != 1
        ):
            raise ValueError(
                f"value_weights must be [{num_reqs}, {self.num_q_heads}, {max_len}] contiguous in tokens, "
                f"got {list(value_weights.shape)}"
            )
        queries = queries if queries.stride(3) == 1 else queries.contiguous()
        if out is None:
            out = torch.empty(num_reqs, self.num_kv_heads, max_len, dtype=torch.float32, device=k_buffer.device)
        causal = query_positions is not None
        pos = query_positions if causal else seq_lens  # placeholder pointer when not causal
        vw = value_weights if value_weights is not None else out
        vw = vw.float() if vw.dtype != torch.float32 else vw
        grid = (num_reqs * self.num_kv_heads, p["num_chunks"])
        qk_scale = self.scaling * _LOG2E
        common = dict(
            NUM_KV_HEADS=self.num_kv_heads, GROUP=self.group, GROUP_P=_next_pow2(self.group), QUERIES_P=p["queries_p"], HEAD_DIM=self.head_dim,
            BLOCK_N=self.block_n, CAUSAL=causal, Q_DOT_DTYPE=_dot_dtype(k_buffer),
        )
        strides_q = (queries.stride(0), queries.stride(1), queries.stride(2), pos.stride(0) if causal else 0)
        strides_k = (k_buffer.stride(0), k_buffer.stride(1), req_to_token.stride(0))
        _row_stats_kernel[grid](
            queries, pos, k_buffer, req_to_token, seq_lens, p["chunk_max"], p["chunk_sum"],
            nq, p["chunk"], p["num_chunks"], qk_scale, *strides_q, *strides_k, **common, num_warps=8,
        )
        _combine_kernel[(grid[0],)](
            p["chunk_max"], p["chunk_sum"], p["row_max"], p["row_weight"], p["num_chunks"], nq, ROWS=p["rows"],
        )
        per_head = p["per_head"]
        dest = per_head if per_head is not None else out
        _accumulate_kernel[grid](
            queries, pos, k_buffer, req_to_token, seq_lens, p["row_max"], p["row_weight"], vw, dest,
            nq, p["chunk"], max_len, qk_scale, *strides_q, *strides_k,
            vw.stride(0), vw.stride(1), dest.stride(0), dest.stride(1),
            **common, HAS_VW=value_weights is not None, PER_HEAD_OUT=per_head is not None,
            GQA_REDUCE=_GQA_REDUCE[self.gqa_reduce], num_warps=8,
        )
        if per_head is not None:
            block = 256
            _pool_reduce_kernel[(grid[0], triton.cdiv(max_len, block))](
                per_head, seq_lens, out, max_len, per_head.stride(0), per_head.stride(1), out.stride(0), out.stride(1),
                NUM_KV_HEADS=self.num_kv_heads, GROUP=self.group, KERNEL=self.pooling_kernel,
                POOL_MODE=_POOL_MODE[self.pooling_mode], GQA_REDUCE=_GQA_REDUCE[self.gqa_reduce], BLOCK=block,
            )
        return out


def gather_request_kv(buffer: torch.Tensor, req_to_token: torch.Tensor, req: int, seq_len: int) -> torch.Tensor:
    """``[num_kv_heads, seq_len, head_dim]`` keys (or values) of request ``req`` from a paged pool."""
    slots = req_to_token[req, :seq_len].long()
    return buffer[slots].transpose(0, 1)


def paged_scores_reference(
    queries: torch.Tensor,
    k_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    seq_lens: torch.Tensor,
    scaling: float,
    query_positions: torch.Tensor | None = None,
    value_weights: torch.Tensor | None = None,
    pooling_kernel: int = 1,
    pooling_mode: str = "max",
    gqa_reduce: str = "mean",
) -> torch.Tensor:
    """PyTorch oracle of :meth:`PagedScoring.run`: gathers each request and calls ``score_queries``.

    Queries are cast to the key dtype first, as the kernel does. Same shapes as :meth:`PagedScoring.run`.
    """
    num_reqs, max_len = req_to_token.shape
    out = torch.zeros(num_reqs, k_buffer.shape[1], max_len, dtype=torch.float32, device=k_buffer.device)
    for r in range(num_reqs):
        n = int(seq_lens[r])
        keys = gather_request_kv(k_buffer, req_to_token, r, n)
        out[r, :, :n] = score_queries(
            queries[r].to(k_buffer.dtype), keys, scaling,
            query_positions=None if query_positions is None else query_positions[r],
            pooling_kernel=pooling_kernel, pooling_mode=pooling_mode, gqa_reduce=gqa_reduce,
            value_weights=None if value_weights is None else value_weights[r, :, :n],
        )
    return out


def paged_value_norms(
    v_buffer: torch.Tensor, req_to_token: torch.Tensor, seq_lens: torch.Tensor, o_proj_weight: torch.Tensor,
    num_q_heads: int,
) -> torch.Tensor:
    """laprox value weights from a paged value pool, as a matmul prep step (no kernel needed).

    ``|W_h v|^2 = v^T (W_h^T W_h) v``: the per-head Gram matrices ``[num_q_heads, head_dim, head_dim]``
    are formed once per layer, so each token costs ``head_dim^2`` multiply-adds per head instead of
    ``head_dim * hidden_size``. Same function as :func:`sgl_evict.scoring.projected_value_norms`.

    Args:
        v_buffer: ``[pool_slots, num_kv_heads, head_dim]`` values of this layer.
        req_to_token: ``[num_reqs, max_len]`` int32 slot table.
        seq_lens: ``[num_reqs]`` lengths.
        o_proj_weight: ``[hidden_size, num_q_heads * head_dim]``.

    Returns:
        ``[num_reqs, num_q_heads, max_len]`` float32, 0 at ``t >= seq_len``.
    """
    num_kv_heads, head_dim = v_buffer.shape[1:]
    w = o_proj_weight.float().reshape(o_proj_weight.shape[0], num_q_heads, head_dim)
    gram = torch.einsum("nhd,nhe->hde", w, w)  # [Hq, d, d]
    values = v_buffer[req_to_token.long()].float()  # [R, L, Hkv, d]
    values = values.repeat_interleave(num_q_heads // num_kv_heads, dim=2)  # [R, L, Hq, d]
    sq = torch.einsum("rlhd,hde,rlhe->rhl", values, gram, values)
    norms = sq.clamp_min(0).sqrt()
    in_seq = torch.arange(req_to_token.shape[1], device=norms.device)[None, :] < seq_lens.to(norms.device)[:, None]
    return norms * in_seq[:, None, :]
