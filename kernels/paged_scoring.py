"""Attention scores of observation queries, read straight from SGLang's paged KV pool (Triton).

Two passes over the keys, never materialising the ``[num_queries, seq_len]`` attention matrix:

1. ``_row_stats``: for every query row, the running max and sum of ``exp(logit - max)`` over a chunk of the
   request's keys (online softmax), one program per (request, KV head, chunk), so a single long request still fills
   the GPU. The last program of a (request, KV head) to finish (an atomic ticket) combines the chunks' statistics into
   one normaliser per row, ``c = log2(sum_t exp(logit_t)) + log2(num_queries)`` (base 2, mean over queries folded in).
2. ``_accumulate``: one program per (request, KV head, chunk) recomputes the logits of its chunk's key blocks,
   ``p = exp2(logit - c)``, and sums them over each query head's queries.

A KV head's query heads (its GQA group) and their queries are one tile of ``group x queries`` rows, so keys are loaded
once per KV head and pass. Keys are gathered through ``req_to_token`` (SGLang's ``ReqToTokenPool.req_to_token``);
negative entries are holes (evicted tokens, ``sgl_evict.holes.HOLE``) and are masked like positions past the end.

Options (keyword arguments of :func:`attention_mass_paged`):

- ``heads_per_launch``: run pass 1 then pass 2 for groups of that many KV heads at a time, so pass 2 re-reads keys
  that pass 1 has just brought into L2 (a KV head of a 32K prompt is 8 MiB of bf16 keys; H100's L2 is 50 MB).
  ``None``: both passes over all heads (two launches).
- ``row_lse``: each query row's natural log-sum-exp over the same keys, when the caller has it (prefill attention
  kernels can return it for SnapKV's window queries). Pass 1 is skipped and pass 2 turns the LSE into each row's
  normaliser itself: one launch, one read of the keys, no PyTorch op before it but the output's allocation.
- pass 2 visits its programs in the reverse order of pass 1 (``reverse_pass2``), so its first blocks are those that
  pass 1 read last, still in L2.

:func:`score_paged` matches :func:`sgl_evict.scoring.score_queries` per request, pooling and GQA reduction included
(those act on the small ``[num_q_heads, seq_len]`` output and run in PyTorch).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from sgl_evict.scoring import finish_scores


# Triton 3.9's interpreter computes tl.dot on bfloat16 operands wrongly (seen: ~2e10 where the answer is ~19), so under
# TRITON_INTERPRET the operands go to float32 first; compiled kernels keep the KV dtype on the tensor cores.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634
_LOG2E_IN_KERNEL = tl.constexpr(_LOG2E)

# the compiled kernels of the last call (name -> Triton's compiled kernel: n_regs, n_spills, asm), for bench/scoring_kernel.py
last_compiled: dict = {}

# JIT specialisation. Triton compiles one variant per "key" of its integer arguments (== 1, divisible by 16) and of
# its pointers (16-byte aligned), on top of the constexprs. Arguments that vary from request to request would make a
# serving process compile new variants (~0.3-1.5 s each on an H100) for its first requests of each new shape, so:
# - not specialised (do_not_specialize): the chunk and split counts, the launch's first KV head, the request-length
#   strides of the slot table (``row.view(1, seq_len)``: stride = seq_len), of the per-split statistics and of the
#   output (``max_len``), and of a caller's LSE (a slice of a batch-shaped buffer). They only enter scalar address
#   arithmetic, where divisibility buys nothing measurable.
# - not specialised on alignment (do_not_specialize_on_alignment): ``ReqToTok``, a row of SGLang's
#   ``req_to_token`` (``req_to_token[req_pool_idx, :seq_len]``): its address moves by ``max_context_len * 4`` bytes
#   per request slot, which is 16-byte aligned or not depending on the context length and the slot (e.g. 65610
#   columns: every odd slot is 8-byte aligned). Only the slot-index loads lose vector width; the key loads do not.
#   ``RowLse`` (pass 2) is not specialised on alignment either: the server hands it one request's window of the
#   prefill's LSE (``WindowQueryCapture.lse_of``), a slice whose offset follows the request's batch position and its
#   number of new tokens; it is read once per program, scalar by row.
# - kept specialised: the KV buffer's strides (``s_kt``, ``s_kh``: fixed per model; their divisibility lets key rows be
#   loaded with 16-byte vectors), the queries' strides (fixed by head_dim and ``NUM_Q``, a constexpr anyway), the
#   positions' strides (fixed by the window), the normaliser/ticket strides (fixed by the model) and ``rev`` (a
#   server setting). The key buffer, queries (``.contiguous()``, or a whole request's window of the capture buffer,
#   ``head_dim``-aligned), outputs and scratch tensors are fresh or whole allocations: aligned every time.
ROW_STATS_DO_NOT_SPECIALIZE = ("chunk", "num_splits", "kvh0", "s_rr", "s_mr", "s_mh")
ACCUMULATE_DO_NOT_SPECIALIZE = ("chunk", "max_len", "kvh0", "s_rr", "s_lr", "s_or", "s_oh")
DO_NOT_SPECIALIZE_ON_ALIGNMENT = ("ReqToTok",)
ACCUMULATE_DO_NOT_SPECIALIZE_ON_ALIGNMENT = ("ReqToTok", "RowLse")


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """``a [m, d] @ b[n, d]^T`` in float32 accumulation; float32 keys stay float32 (no TF32 rounding)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)))
    if IEEE:
        return tl.dot(a, tl.trans(b), input_precision="ieee")
    return tl.dot(a, tl.trans(b)).to(tl.float32)


@triton.jit
def _load_queries(Q, req, kvh, s_qr, s_qh, s_qn, NUM_Q: tl.constexpr, GROUP: tl.constexpr, NQ_P: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.arange(0, GROUP * NQ_P)
    g, i = rows // NQ_P, rows % NQ_P
    d = tl.arange(0, BLOCK_D)
    return tl.load(Q + req * s_qr + (kvh * GROUP + g)[:, None] * s_qh + i[:, None] * s_qn + d[None, :],
                   mask=(i < NUM_Q)[:, None] & (d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _logits(q, K, ReqToTok, req, kvh, n, seq_len, qpos, row_ok, scale, s_kt, s_kh, s_rr,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
            IEEE: tl.constexpr, TRANS: tl.constexpr):
    """Scaled logits of a block of keys (positions ``n``) and the mask of those that count: inside the request,
    not a hole (negative slot), not after the query (causal). ``[rows, BLOCK_N]``, or ``[BLOCK_N, rows]`` if
    ``TRANS`` (keys as the matrix product's M: large tiles with few rows, and reductions over rows in a thread)."""
    d = tl.arange(0, BLOCK_D)
    slot = tl.load(ReqToTok + req * s_rr + n, mask=n < seq_len, other=-1).to(tl.int64)
    live = slot >= 0  # holes (HOLE = -1, sgl_evict.holes) and positions past the end
    k = tl.load(K + slot[:, None] * s_kt + kvh * s_kh + d[None, :], mask=live[:, None] & (d[None, :] < HEAD_DIM),
                other=0.0)
    k = k.to(q.dtype)  # FP8 keys (a float8 pool) widen to the queries' 16-bit type; a no-op otherwise
    if TRANS:
        logits = _dot(k, q, DOT_FP32, IEEE) * scale
        ok = live[:, None] & row_ok[None, :]
        if CAUSAL:
            ok = ok & (n[:, None] <= qpos[None, :])
    else:
        logits = _dot(q, k, DOT_FP32, IEEE) * scale  # scale includes log2(e): everything is in base 2
        ok = live[None, :] & row_ok[:, None]
        if CAUSAL:
            ok = ok & (n[None, :] <= qpos[:, None])
    return logits, ok


@triton.jit(do_not_specialize=ROW_STATS_DO_NOT_SPECIALIZE,
            do_not_specialize_on_alignment=DO_NOT_SPECIALIZE_ON_ALIGNMENT)
def _row_stats(Q, K, ReqToTok, SeqLens, QPos, PartM, PartL, Ticket, RowC, scale, log2_nq, chunk, num_splits, kvh0,
               s_qr, s_qh, s_qn, s_kt, s_kh, s_rr, s_pr, s_pn, s_mr, s_mh, s_ms, s_cr, s_ch, s_tr,
               NUM_Q: tl.constexpr, GROUP: tl.constexpr, NQ_P: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
               IEEE: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    req = tl.program_id(0)
    kvh = kvh0 + tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.arange(0, GROUP * NQ_P)
    i = rows % NQ_P
    row_ok = i < NUM_Q
    q = _load_queries(Q, req, kvh, s_qr, s_qh, s_qn, NUM_Q, GROUP, NQ_P, HEAD_DIM, BLOCK_D)
    seq_len = tl.load(SeqLens + req).to(tl.int32)  # the caller's int dtype: no cast kernel before the launch
    if CAUSAL:
        qpos = tl.load(QPos + req * s_pr + i * s_pn, mask=row_ok, other=0).to(tl.int32)
    else:
        qpos = i  # unused
    m = tl.full([GROUP * NQ_P], float("-inf"), tl.float32)
    s = tl.zeros([GROUP * NQ_P], tl.float32)
    for n0 in range(split * chunk, tl.minimum(seq_len, (split + 1) * chunk), BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        logits, ok = _logits(q, K, ReqToTok, req, kvh, n, seq_len, qpos, row_ok, scale, s_kt, s_kh, s_rr,
                             HEAD_DIM, BLOCK_D, CAUSAL, DOT_FP32, IEEE, False)
        logits = tl.where(ok, logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp2(m - m_safe) + tl.sum(tl.exp2(logits - m_safe[:, None]), axis=1)
        m = m_new
    base = req * s_mr + kvh * s_mh + rows
    tl.store(PartM + base + split * s_ms, m)
    tl.store(PartL + base + split * s_ms, s)
    # the last program of this (request, KV head) combines the chunks' statistics: one normaliser per row
    tl.debug_barrier()  # every thread's partial stores precede the release below
    ticket = tl.atomic_add(Ticket + req * s_tr + kvh, 1, sem="acq_rel", scope="gpu")
    if ticket == num_splits - 1:
        sb = tl.arange(0, SPLIT_BLOCK)
        m_all = tl.full([GROUP * NQ_P], float("-inf"), tl.float32)
        s_all = tl.zeros([GROUP * NQ_P], tl.float32)
        for sp0 in range(0, num_splits, SPLIT_BLOCK):  # online softmax over blocks of chunks' statistics
            sp = sp0 + sb
            ptr = base[None, :] + sp[:, None] * s_ms
            pm = tl.load(PartM + ptr, mask=(sp < num_splits)[:, None], other=float("-inf"), cache_modifier=".cg")
            pl = tl.load(PartL + ptr, mask=(sp < num_splits)[:, None], other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m_all, tl.max(pm, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_all = s_all * tl.exp2(m_all - m_safe) + tl.sum(pl * tl.exp2(pm - m_safe[None, :]), axis=0)
            m_all = m_new
        m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
        # rows with no key at all get +inf: exp2(logit - inf) = 0 (and pass 2 masks them anyway)
        c = tl.where(s_all > 0, m_safe + tl.log2(tl.where(s_all > 0, s_all, 1.0)) + log2_nq, float("inf"))
        tl.store(RowC + req * s_cr + kvh * s_ch + rows, c)


@triton.jit(do_not_specialize=ACCUMULATE_DO_NOT_SPECIALIZE,
            do_not_specialize_on_alignment=ACCUMULATE_DO_NOT_SPECIALIZE_ON_ALIGNMENT)
def _accumulate(Q, K, ReqToTok, SeqLens, QPos, RowC, RowLse, Out, scale, log2_nq, chunk, max_len, kvh0, rev,
                s_qr, s_qh, s_qn, s_kt, s_kh, s_rr, s_pr, s_pn, s_cr, s_ch, s_lr, s_lh, s_ln, s_or, s_oh,
                NUM_Q: tl.constexpr, GROUP: tl.constexpr, NQ_P: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
                IEEE: tl.constexpr, TRANS: tl.constexpr, FROM_LSE: tl.constexpr):
    """Pass 2. Each row's normaliser ``c`` comes from ``RowC`` (``[num_reqs, num_kv_heads, GROUP * NQ_P]``, pass 1's
    output) or, if ``FROM_LSE``, from the caller's natural log-sum-exp ``RowLse`` (``[num_reqs, num_q_heads,
    num_queries]``, any float dtype, strides ``s_l*``)."""
    # rev = 1: programs run in the reverse order of pass 1's, so the keys pass 1 read last (still in L2) come first
    p0, p1, p2 = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    req = p0 + rev * (tl.num_programs(0) - 1 - 2 * p0)
    kvh = kvh0 + p1 + rev * (tl.num_programs(1) - 1 - 2 * p1)
    split = p2 + rev * (tl.num_programs(2) - 1 - 2 * p2)
    seq_len = tl.load(SeqLens + req).to(tl.int32)  # the caller's int dtype: no cast kernel before the launch
    rows = tl.arange(0, GROUP * NQ_P)
    g, i = rows // NQ_P, rows % NQ_P
    row_ok = i < NUM_Q
    gs = tl.arange(0, GROUP)
    # c: log2 of each row's normaliser (x num_queries), so that p = exp2(logit - c) is the row's share of the mean
    if FROM_LSE:
        lse = tl.load(RowLse + req * s_lr + (kvh * GROUP + g) * s_lh + i * s_ln, mask=row_ok,
                      other=float("-inf")).to(tl.float32)
        # padded rows and rows with no key at all (lse = -inf) get +inf, as pass 1 gives them: p = exp2(-inf) = 0
        c = tl.where(lse > float("-inf"), lse * _LOG2E_IN_KERNEL + log2_nq, float("inf"))
    else:
        c = tl.load(RowC + req * s_cr + kvh * s_ch + rows)
    q = _load_queries(Q, req, kvh, s_qr, s_qh, s_qn, NUM_Q, GROUP, NQ_P, HEAD_DIM, BLOCK_D)
    if CAUSAL:
        qpos = tl.load(QPos + req * s_pr + i * s_pn, mask=row_ok, other=0).to(tl.int32)
    else:
        qpos = i  # unused
    for n0 in range(split * chunk, tl.minimum(max_len, (split + 1) * chunk), BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        out_ptr = Out + req * s_or + (kvh * GROUP + gs)[:, None] * s_oh + n[None, :]
        out_ok = (n < max_len)[None, :] & (gs < GROUP)[:, None]
        # no branch for blocks past the request's end (their keys are masked, p = 0, zeros are written): a branch
        # around the loads keeps Triton from software-pipelining them
        logits, ok = _logits(q, K, ReqToTok, req, kvh, n, seq_len, qpos, row_ok, scale, s_kt, s_kh, s_rr,
                             HEAD_DIM, BLOCK_D, CAUSAL, DOT_FP32, IEEE, TRANS)
        if TRANS:
            p = tl.where(ok, tl.exp2(logits - c[None, :]), 0.0)
            per_head = tl.sum(tl.reshape(p, [BLOCK_N, GROUP, NQ_P]), axis=2)  # mean over a head's queries
            tl.store(out_ptr, tl.trans(per_head), mask=out_ok)
        else:
            p = tl.where(ok, tl.exp2(logits - c[:, None]), 0.0)
            per_head = tl.sum(tl.reshape(p, [GROUP, NQ_P, BLOCK_N]), axis=1)  # mean over a head's queries
            tl.store(out_ptr, per_head, mask=out_ok)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


#: FP8 KV cache dtypes (SGLang's ``--kv-cache-dtype fp8_e4m3`` / ``fp8_e5m2``)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)


def _query_dtype(query_dtype: torch.dtype, key_dtype: torch.dtype) -> torch.dtype:
    """The dtype the queries enter the kernel in: the keys' (as the tensor cores take them), except over an FP8 pool,
    whose keys widen to the queries' 16-bit type (bfloat16 for float32 queries)."""
    if key_dtype not in FP8_DTYPES:
        return key_dtype
    return query_dtype if query_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


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
    *,
    row_lse: torch.Tensor | None = None,
    heads_per_launch: int | None = None,
    reverse_pass2: bool = True,
    num_programs: int = 512,
    transpose_pass2: bool = False,
    key_scale: float = 1.0,
) -> torch.Tensor:
    """Mean attention each query head's observation queries pay to each key, from a paged pool.

    Args:
        queries: ``[num_reqs, num_q_heads, num_queries, head_dim]`` post-RoPE observation queries.
        k_buffer: ``[pool_slots, num_kv_heads, head_dim]`` one layer's keys (bf16, fp16 or fp32).
        req_to_token: ``[num_reqs, max_len]`` int32/int64 slot of each request's token ``t``; a negative entry is a
            hole (an evicted token, ``sgl_evict.holes.HOLE``): that key is left out, like keys past the end.
        seq_lens: ``[num_reqs]`` int prompt lengths (keys ``t >= seq_len`` are ignored).
        scaling: logit scale.
        query_positions: ``[num_reqs, num_queries]`` positions of queries inside the prompt (each sees keys up to
            its own position), or ``None`` (queries after the prompt see every key).
        block_n: keys per loop step of a program.
        num_warps, num_stages: Triton launch options of both passes.
        row_lse: optional ``[num_reqs, num_q_heads, num_queries]`` natural log-sum-exp of each query row's logits
            ``scaling * q.k`` over the same keys (live, inside the request, causal if positions are given), any
            float dtype and strides, on the queries' device; ``-inf`` for a row with no key. Pass 1 is then skipped
            and pass 2 reads it directly: one launch, the keys read once. The result is exact only if ``row_lse``
            is.
        heads_per_launch: run both passes for this many KV heads at a time (pass 2 right behind pass 1 while the
            keys are in L2); ``None``: all heads in one launch per pass.
        reverse_pass2: pass 2 visits its programs in the reverse order of pass 1.
        num_programs: programs per launch to aim for (a long request is split into that many chunks).
        transpose_pass2: pass 2 computes ``keys @ queries^T`` (keys as the product's M dimension) instead of
            ``queries @ keys^T``.
        key_scale: the pool's key scale: the keys are ``k_buffer * key_scale`` (SGLang's ``k_scale`` of an FP8 KV
            cache, which stores ``k / k_scale``; 1.0 for a 16-bit pool). Folded into the logit scale; a
            ``row_lse`` must be of the scaled keys' logits (as the attention that returned it computed them).

    Returns:
        ``[num_reqs, num_q_heads, max_len]`` float32; zero past each request's length and at holes.
    """
    num_reqs, num_q_heads, num_queries, head_dim = queries.shape
    num_kv_heads = k_buffer.shape[1]
    group = num_q_heads // num_kv_heads
    if num_q_heads % num_kv_heads or group & (group - 1):
        raise ValueError(f"GQA group size must be a power of two, got {num_q_heads} / {num_kv_heads}")
    max_len = req_to_token.shape[1]
    hpl = num_kv_heads if heads_per_launch is None else heads_per_launch
    if hpl < 1 or num_kv_heads % hpl:
        raise ValueError(f"heads_per_launch must divide num_kv_heads={num_kv_heads}, got {heads_per_launch}")
    # tl.dot needs at least 16 rows: pad the queries of a head to a power of two that gets there
    nq_p = max(_next_pow2(num_queries), 16 // group if group < 16 else 1)
    rows = group * nq_p
    dev = queries.device
    # no-ops (no kernel) for the usual inputs: queries in the KV dtype, contiguous; seq_lens and positions are read in
    # whatever int dtype they come in. An FP8 pool's keys are widened in the kernel to the queries' 16-bit type.
    queries = queries.to(_query_dtype(queries.dtype, k_buffer.dtype)).contiguous()
    seq_lens = seq_lens.contiguous()
    causal = query_positions is not None
    qpos = query_positions if causal else seq_lens  # not read unless causal
    s_pr, s_pn = (qpos.stride(0), qpos.stride(1)) if causal else (0, 0)
    # enough chunks that (requests x KV heads of a launch x chunks) covers the GPU several times over
    splits = max(1, min(triton.cdiv(max_len, block_n), triton.cdiv(num_programs, num_reqs * hpl)))
    chunk = triton.cdiv(triton.cdiv(max_len, splits), block_n) * block_n
    splits = triton.cdiv(max_len, chunk)
    if row_lse is not None:
        # checks on metadata only: no device -> host copy, so the call stays capturable in a CUDA graph
        if row_lse.shape != (num_reqs, num_q_heads, num_queries):
            raise ValueError(f"row_lse must be {(num_reqs, num_q_heads, num_queries)}, got {tuple(row_lse.shape)}")
        if not row_lse.is_floating_point() or row_lse.device != dev:
            raise ValueError(f"row_lse must be a float tensor on {dev}, got {row_lse.dtype} on {row_lse.device}")
        row_c = lse = row_lse  # pass 2 reads row_lse only (row_c is a placeholder argument)
    else:
        # per row: log2 of (sum of exp of its logits) x num_queries, so that pass 2's p = exp2(logit - c) is the mean
        row_c = torch.empty(num_reqs, num_kv_heads, rows, dtype=torch.float32, device=dev)
        stats_shape = (num_reqs, num_kv_heads, splits, rows)
        part_max = torch.empty(stats_shape, dtype=torch.float32, device=dev)
        part_sum = torch.empty(stats_shape, dtype=torch.float32, device=dev)
        ticket = torch.zeros(num_reqs, num_kv_heads, dtype=torch.int32, device=dev)
        lse = row_c  # placeholder argument, not read
    out = torch.empty(num_reqs, num_q_heads, max_len, dtype=torch.float32, device=dev)
    scale = scaling * key_scale * _LOG2E  # the kernels use exp2 (one instruction, no extra multiply)
    log2_nq = math.log2(num_queries)
    common = dict(num_warps=num_warps, num_stages=num_stages, NUM_Q=num_queries, GROUP=group, NQ_P=nq_p,
                  HEAD_DIM=head_dim, BLOCK_D=max(16, _next_pow2(head_dim)), BLOCK_N=block_n, CAUSAL=causal,
                  DOT_FP32=_INTERPRETING, IEEE=k_buffer.dtype == torch.float32)
    strides = (queries.stride(0), queries.stride(1), queries.stride(2), k_buffer.stride(0), k_buffer.stride(1),
               req_to_token.stride(0), s_pr, s_pn)
    grid = (num_reqs, hpl, splits)
    # chunks' statistics combined per step of pass 1's last program: sized by the most splits a launch of this
    # head count can have (one request's), not by this prompt's or this batch's (a constexpr that followed the
    # prompt length or the number of requests would compile a variant per power of two of either: a batch of
    # requests shares a launch, sgl_evict/engine/score_plan.py); the combine loop masks the splits past num_splits
    split_block = min(_next_pow2(max(1, triton.cdiv(num_programs, hpl))), max(1, 4096 // rows))
    for kvh0 in range(0, num_kv_heads, hpl):
        if row_lse is None:
            last_compiled["row_stats"] = _row_stats[grid](
                queries, k_buffer, req_to_token, seq_lens, qpos, part_max, part_sum, ticket, row_c, scale,
                log2_nq, chunk, splits, kvh0, *strides, part_max.stride(0), part_max.stride(1),
                part_max.stride(2), row_c.stride(0), row_c.stride(1), ticket.stride(0),
                SPLIT_BLOCK=split_block, **common)
        last_compiled["accumulate"] = _accumulate[grid](
            queries, k_buffer, req_to_token, seq_lens, qpos, row_c, lse, out, scale, log2_nq, chunk, max_len, kvh0,
            int(reverse_pass2), *strides, row_c.stride(0), row_c.stride(1), lse.stride(0), lse.stride(1),
            lse.stride(2), out.stride(0), out.stride(1), TRANS=transpose_pass2, FROM_LSE=row_lse is not None,
            **common)
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
    **kernel_options,
) -> list[torch.Tensor]:
    """Per-KV-head token scores of a batch of requests: :func:`sgl_evict.scoring.score_queries` on a paged pool.

    ``value_weights`` (laprox), if given, is ``[num_reqs, num_q_heads, max_len]``. ``kernel_options`` go to
    :func:`attention_mass_paged` (``row_lse``, ``heads_per_launch``, ``block_n``, ...). Holes (negative entries of
    ``req_to_token``) score 0.

    Returns:
        one ``[num_kv_heads, seq_len_i]`` float32 tensor per request.
    """
    mass = attention_mass_paged(queries, k_buffer, req_to_token, seq_lens, scaling, query_positions, **kernel_options)
    # finish each request within its own length: avg pooling must not count the zeros past its end
    return [finish_scores(mass[r, :, :n], k_buffer.shape[1], pooling_kernel, pooling_mode, gqa_reduce,
                          None if value_weights is None else value_weights[r, :, :n])
            for r, n in enumerate(seq_lens.tolist())]
