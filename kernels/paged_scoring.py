"""Attention scores of observation queries, read straight from SGLang's paged KV pool (Triton).

Two passes over the keys, never materialising the ``[num_queries, seq_len]`` attention matrix:

1. ``_row_stats``: for every query, the running max and sum of ``exp(logit - max)`` over a chunk of the request's
   keys (online softmax), one program per (request, KV head, chunk), so a single long request still fills the GPU.
2. ``_accumulate``: one program per (request, KV head, chunk) combines the chunks' statistics, then for each key
   block of its chunk recomputes the logits, normalises them and sums them over each query head's queries.

A KV head's query heads (its GQA group) and their queries are one tile of ``group x queries`` rows, so keys are loaded
once per KV head and pass. Keys are gathered through ``req_to_token`` (SGLang's ``ReqToTokenPool.req_to_token``).

:func:`score_paged` matches :func:`sgl_evict.scoring.score_queries` per request, pooling and GQA reduction included
(those act on the small ``[num_q_heads, seq_len]`` output and run in PyTorch).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sgl_evict.scoring import finish_scores


# Triton 3.9's interpreter computes tl.dot on bfloat16 operands wrongly (seen: ~2e10 where the answer is ~19), so under
# TRITON_INTERPRET the operands go to float32 first; compiled kernels keep the KV dtype on the tensor cores.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot(q, k, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """``q [rows, d] @ k[n, d]^T`` in float32 accumulation; float32 keys stay float32 (no TF32 rounding)."""
    if DOT_FP32:
        return tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
    if IEEE:
        return tl.dot(q, tl.trans(k), input_precision="ieee")
    return tl.dot(q, tl.trans(k)).to(tl.float32)


@triton.jit
def _row_stats(Q, K, ReqToTok, SeqLens, QPos, M, L, scale, chunk,
               s_qr, s_qh, s_qn, s_kt, s_kh, s_rr, s_pr, s_mr, s_mh, s_ms,
               NUM_Q: tl.constexpr, GROUP: tl.constexpr, NQ_P: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
               IEEE: tl.constexpr):
    req = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.arange(0, GROUP * NQ_P)
    g, i = rows // NQ_P, rows % NQ_P
    row_ok = i < NUM_Q
    d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + req * s_qr + (kvh * GROUP + g)[:, None] * s_qh + i[:, None] * s_qn + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    seq_len = tl.load(SeqLens + req)
    if CAUSAL:
        qpos = tl.load(QPos + req * s_pr + i, mask=row_ok, other=0)
    m = tl.full([GROUP * NQ_P], float("-inf"), tl.float32)
    s = tl.zeros([GROUP * NQ_P], tl.float32)
    for n0 in range(split * chunk, tl.minimum(seq_len, (split + 1) * chunk), BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < seq_len
        slot = tl.load(ReqToTok + req * s_rr + n, mask=n_ok, other=0).to(tl.int64)
        k = tl.load(K + slot[:, None] * s_kt + kvh * s_kh + d[None, :], mask=n_ok[:, None] & (d[None, :] < HEAD_DIM),
                    other=0.0)
        logits = _dot(q, k, DOT_FP32, IEEE) * scale  # scale includes log2(e): statistics are in base 2
        ok = n_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            ok = ok & (n[None, :] <= qpos[:, None])
        logits = tl.where(ok, logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp2(m - m_safe) + tl.sum(tl.exp2(logits - m_safe[:, None]), axis=1)
        m = m_new
    base = req * s_mr + kvh * s_mh + split * s_ms + rows
    tl.store(M + base, m)
    tl.store(L + base, s)


@triton.jit
def _accumulate(Q, K, ReqToTok, SeqLens, QPos, PartM, PartL, Out, scale, chunk, num_splits, max_len,
                s_qr, s_qh, s_qn, s_kt, s_kh, s_rr, s_pr, s_mr, s_mh, s_ms, s_or, s_oh,
                NUM_Q: tl.constexpr, GROUP: tl.constexpr, NQ_P: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
                IEEE: tl.constexpr):
    req = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + req)
    rows = tl.arange(0, GROUP * NQ_P)
    g, i = rows // NQ_P, rows % NQ_P
    row_ok = i < NUM_Q
    gs = tl.arange(0, GROUP)
    # combine the chunks' softmax statistics (the [splits, rows] partials of _row_stats)
    stats = PartM + req * s_mr + kvh * s_mh + rows
    m = tl.full([GROUP * NQ_P], float("-inf"), tl.float32)
    for sp in range(0, num_splits):
        m = tl.maximum(m, tl.load(stats + sp * s_ms))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.zeros([GROUP * NQ_P], tl.float32)
    for sp in range(0, num_splits):
        s += tl.load(PartL + req * s_mr + kvh * s_mh + sp * s_ms + rows) * tl.exp2(tl.load(stats + sp * s_ms) - m_safe)
    # one reciprocal per row (not a division per element), with the mean over a head's queries folded in
    inv_s = 1.0 / tl.where(s > 0, s * NUM_Q, 1.0)  # rows with s == 0 are fully masked below
    d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + req * s_qr + (kvh * GROUP + g)[:, None] * s_qh + i[:, None] * s_qn + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    if CAUSAL:
        qpos = tl.load(QPos + req * s_pr + i, mask=row_ok, other=0)
    for n0 in range(split * chunk, tl.minimum(max_len, (split + 1) * chunk), BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < seq_len
        out_ptr = Out + req * s_or + (kvh * GROUP + gs)[:, None] * s_oh + n[None, :]
        out_ok = (n < max_len)[None, :] & (gs < GROUP)[:, None]
        if n0 >= seq_len:  # block past this request's end: zeros, so every output element is written
            tl.store(out_ptr, tl.zeros([GROUP, BLOCK_N], tl.float32), mask=out_ok)
        else:
            slot = tl.load(ReqToTok + req * s_rr + n, mask=n_ok, other=0).to(tl.int64)
            k = tl.load(K + slot[:, None] * s_kt + kvh * s_kh + d[None, :],
                        mask=n_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
            logits = _dot(q, k, DOT_FP32, IEEE) * scale
            ok = n_ok[None, :] & row_ok[:, None]
            if CAUSAL:
                ok = ok & (n[None, :] <= qpos[:, None])
            p = tl.where(ok, tl.exp2(logits - m_safe[:, None]) * inv_s[:, None], 0.0)
            per_head = tl.sum(tl.reshape(p, [GROUP, NQ_P, BLOCK_N]), axis=1)  # mean over a head's queries
            tl.store(out_ptr, per_head, mask=out_ok)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def attention_mass_paged(
    queries: torch.Tensor,
    k_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    seq_lens: torch.Tensor,
    scaling: float,
    query_positions: torch.Tensor | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Mean attention each query head's observation queries pay to each key, from a paged pool.

    Args:
        queries: ``[num_reqs, num_q_heads, num_queries, head_dim]`` post-RoPE observation queries.
        k_buffer: ``[pool_slots, num_kv_heads, head_dim]`` one layer's keys (bf16, fp16 or fp32).
        req_to_token: ``[num_reqs, max_len]`` int32/int64 slot of each request's token ``t``.
        seq_lens: ``[num_reqs]`` prompt lengths (keys ``t >= seq_len`` are ignored).
        scaling: logit scale.
        query_positions: ``[num_reqs, num_queries]`` positions of queries inside the prompt (each sees keys up to
            its own position), or ``None`` (queries after the prompt see every key).
        block_n: keys per loop step of a program.
        num_warps, num_stages: Triton launch options of both passes.

    Returns:
        ``[num_reqs, num_q_heads, max_len]`` float32; zero past each request's length.
    """
    num_reqs, num_q_heads, num_queries, head_dim = queries.shape
    num_kv_heads = k_buffer.shape[1]
    group = num_q_heads // num_kv_heads
    if num_q_heads % num_kv_heads or group & (group - 1):
        raise ValueError(f"GQA group size must be a power of two, got {num_q_heads} / {num_kv_heads}")
    max_len = req_to_token.shape[1]
    # tl.dot needs at least 16 rows: pad the queries of a head to a power of two that gets there
    nq_p = max(_next_pow2(num_queries), 16 // group if group < 16 else 1)
    queries = queries.to(k_buffer.dtype).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    causal = query_positions is not None
    qpos = (query_positions.to(torch.int32).contiguous() if causal
            else torch.zeros(num_reqs, 1, dtype=torch.int32, device=queries.device))
    # enough chunks that (requests x KV heads x chunks) covers the GPU several times over
    splits = max(1, min(triton.cdiv(max_len, block_n), triton.cdiv(512, num_reqs * num_kv_heads)))
    chunk = triton.cdiv(triton.cdiv(max_len, splits), block_n) * block_n
    splits = triton.cdiv(max_len, chunk)
    stats_shape = (num_reqs, num_kv_heads, splits, group * nq_p)
    part_max = torch.empty(stats_shape, dtype=torch.float32, device=queries.device)
    part_sum = torch.empty(stats_shape, dtype=torch.float32, device=queries.device)
    out = torch.empty(num_reqs, num_q_heads, max_len, dtype=torch.float32, device=queries.device)
    scaling = scaling * 1.4426950408889634  # log2(e): the kernels use exp2 (one instruction, no extra multiply)
    common = dict(num_warps=num_warps, num_stages=num_stages, NUM_Q=num_queries, GROUP=group, NQ_P=nq_p, HEAD_DIM=head_dim,
                  BLOCK_D=max(16, _next_pow2(head_dim)), BLOCK_N=block_n, CAUSAL=causal, DOT_FP32=_INTERPRETING,
                  IEEE=k_buffer.dtype == torch.float32)
    strides = (queries.stride(0), queries.stride(1), queries.stride(2), k_buffer.stride(0), k_buffer.stride(1),
               req_to_token.stride(0), qpos.stride(0))
    _row_stats[(num_reqs, num_kv_heads, splits)](
        queries, k_buffer, req_to_token, seq_lens, qpos, part_max, part_sum, scaling, chunk, *strides,
        part_max.stride(0), part_max.stride(1), part_max.stride(2), **common)
    _accumulate[(num_reqs, num_kv_heads, splits)](
        queries, k_buffer, req_to_token, seq_lens, qpos, part_max, part_sum, out, scaling, chunk, splits, max_len,
        *strides, part_max.stride(0), part_max.stride(1), part_max.stride(2), out.stride(0), out.stride(1), **common)
    return out


def score_paged(
    queries: torch.Tensor,
    k_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    seq_lens: torch.Tensor,
    scaling: float,
    query_positions: torch.Tensor | None = None,
    pooling_kernel: int = 1,
    pooling_mode: str = "max",
    gqa_reduce: str = "mean",
    value_weights: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Per-KV-head token scores of a batch of requests: :func:`sgl_evict.scoring.score_queries` on a paged pool.

    ``value_weights`` (laprox), if given, is ``[num_reqs, num_q_heads, max_len]``.

    Returns:
        one ``[num_kv_heads, seq_len_i]`` float32 tensor per request.
    """
    mass = attention_mass_paged(queries, k_buffer, req_to_token, seq_lens, scaling, query_positions)
    # finish each request within its own length: avg pooling must not count the zeros past its end
    return [finish_scores(mass[r, :, :n], k_buffer.shape[1], pooling_kernel, pooling_mode, gqa_reduce,
                          None if value_weights is None else value_weights[r, :, :n])
            for r, n in enumerate(seq_lens.tolist())]
