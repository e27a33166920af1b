"""Page-granular keep selection and compaction of SGLang's token->slot table (Triton).

For a batch of requests with one score per prompt token (head- and layer-aggregated, the ``uniform`` granularity: the
only one a paged pool, whose slots are shared by every layer, turns into freed memory):

1. ``_page_scores``: each page of ``page_size`` tokens scores the **sum** of its tokens' scores (so a partial last page
   is not favoured); a page holding a protected token (one of the first ``sinks`` or last ``recent``) scores +inf.
2. ranking: a stable descending sort of the page scores on the device (``torch.sort``), so equal scores keep the earlier
   page, as :func:`sgl_evict.selection.select_keep` does; the best ``max(ceil(budget / page_size), protected pages)``
   pages are kept whole. Top-k stays in ``torch.sort``: it is ``[num_reqs, max_len / page_size]`` floats, small
   next to the scoring pass, and a hand-written radix select would be a large kernel for no measured gain.
3. ``_compact``: one program per request walks its tokens in blocks, writes the token keep mask, and writes the slots
   of kept tokens to the front of a compacted table with a running prefix sum (``tl.cumsum``), so attention can run
   over kept slots only; entries past each request's kept length are -1.

With ``page_size == 1`` this is exactly ``select_keep(..., granularity="per_head")`` on one head's scores.
:func:`select_pages_reference` and :func:`compact_reference` are the PyTorch definitions the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


# JIT specialisation (see kernels/paged_scoring.py): the lengths, page counts, per-request strides (the engine passes
# ``row.view(1, seq_len)``-shaped tables: stride = seq_len) and the sinks / recent counts (per-request overrides) vary
# from request to request and are not specialised, so a server does not compile a variant per prompt length. The slot
# table ``ReqToTok`` is a row of SGLang's ``req_to_token`` whose alignment depends on the request slot: not
# specialised on alignment either. Only ``PAGE`` (the pool's page size) and the block sizes are compile-time.
PAGE_SCORES_DO_NOT_SPECIALIZE = ("max_len", "max_pages", "sinks", "recent", "s_sr", "s_or")
COMPACT_DO_NOT_SPECIALIZE = ("max_len", "s_kr", "s_rr", "s_mr", "s_cr")
COMPACT_DO_NOT_SPECIALIZE_ON_ALIGNMENT = ("ReqToTok",)


@triton.jit(do_not_specialize=PAGE_SCORES_DO_NOT_SPECIALIZE)
def _page_scores(Scores, SeqLens, Out, max_len, max_pages, sinks, recent, s_sr, s_or,
                 PAGE: tl.constexpr, PAGE_P: tl.constexpr, BLOCK_P: tl.constexpr):
    req = tl.program_id(0)
    pages = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    seq_len = tl.load(SeqLens + req)
    tok = pages[:, None] * PAGE + tl.arange(0, PAGE_P)[None, :]
    tok_ok = (tl.arange(0, PAGE_P)[None, :] < PAGE) & (tok < seq_len)
    total = tl.sum(tl.load(Scores + req * s_sr + tok, mask=tok_ok, other=0.0).to(tl.float32), axis=1)
    first = pages * PAGE
    last = tl.minimum(first + PAGE, seq_len) - 1
    in_prompt = first < seq_len
    protected = in_prompt & ((first < sinks) | (last >= seq_len - recent))
    total = tl.where(protected, float("inf"), total)
    total = tl.where(in_prompt, total, float("-inf"))  # pages past the end rank last and are never counted kept
    tl.store(Out + req * s_or + pages, total, mask=pages < max_pages)


@triton.jit(do_not_specialize=COMPACT_DO_NOT_SPECIALIZE,
            do_not_specialize_on_alignment=COMPACT_DO_NOT_SPECIALIZE_ON_ALIGNMENT)
def _compact(KeepPage, ReqToTok, SeqLens, KeepMask, Compact, KeptLens, max_len, s_kr, s_rr, s_mr, s_cr,
             PAGE: tl.constexpr, BLOCK: tl.constexpr):
    req = tl.program_id(0)
    seq_len = tl.load(SeqLens + req)
    kept = 0
    for n0 in range(0, max_len, BLOCK):
        t = n0 + tl.arange(0, BLOCK)
        in_table = t < max_len
        keep = tl.load(KeepPage + req * s_kr + t // PAGE, mask=t < seq_len, other=0) != 0
        tl.store(KeepMask + req * s_mr + t, keep.to(tl.int8), mask=in_table)
        slot = tl.load(ReqToTok + req * s_rr + t, mask=keep, other=0)
        pos = kept + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(Compact + req * s_cr + pos, slot, mask=keep)
        kept += tl.sum(keep.to(tl.int32), axis=0)
    tl.store(KeptLens + req, kept)
    for n0 in range((kept // BLOCK) * BLOCK, max_len, BLOCK):  # the tail past the kept tokens: -1
        t = n0 + tl.arange(0, BLOCK)
        tl.store(Compact + req * s_cr + t, tl.full([BLOCK], -1, tl.int32).to(Compact.dtype.element_ty),
                 mask=(t >= kept) & (t < max_len))


@dataclass
class Selection:
    """Kept tokens of a batch of requests.

    Attributes:
        keep_mask: ``[num_reqs, max_len]`` bool, True for kept tokens (False past each request's length).
        req_to_token: ``[num_reqs, max_len]`` compacted slot table: the kept slots in token order, then -1.
        kept_lens: ``[num_reqs]`` int32 kept tokens per request (a multiple of ``page_size`` unless the last
            partial page is kept).
        num_keep_pages: ``[num_reqs]`` int64 kept pages per request.
    """

    keep_mask: torch.Tensor
    req_to_token: torch.Tensor
    kept_lens: torch.Tensor
    num_keep_pages: torch.Tensor


def _num_keep_pages(seq_lens, budget_tokens, page_scores, page_size):
    """``[num_reqs]``: ``max(ceil(budget / page_size), protected pages)`` capped at the prompt's pages.

    Protected pages are the ones ``_page_scores`` set to +inf (token scores are checked finite).
    """
    num_pages = (seq_lens + page_size - 1) // page_size
    protected = torch.isinf(page_scores).logical_and(page_scores > 0).sum(-1)
    wanted = (budget_tokens + page_size - 1) // page_size
    return torch.minimum(torch.maximum(wanted, protected), num_pages)


def _check(scores, req_to_token, seq_lens, budget_tokens, page_size, sinks, recent):
    if scores.dim() != 2 or req_to_token.shape != scores.shape:
        raise ValueError(f"scores and req_to_token must both be [num_reqs, max_len], got {tuple(scores.shape)} and "
                         f"{tuple(req_to_token.shape)}")
    if seq_lens.shape != (scores.shape[0],) or budget_tokens.shape != (scores.shape[0],):
        raise ValueError(f"seq_lens and budget_tokens must be [num_reqs={scores.shape[0]}]")
    if page_size < 1 or sinks < 0 or recent < 0:
        raise ValueError(f"page_size must be >= 1 and sinks, recent >= 0; got {page_size}, {sinks}, {recent}")
    if int(seq_lens.max()) > scores.shape[1]:
        raise ValueError(f"a seq_len exceeds max_len {scores.shape[1]}")
    in_prompt = torch.arange(scores.shape[1], device=scores.device)[None, :] < seq_lens[:, None]
    if not torch.isfinite(scores.masked_fill(~in_prompt, 0.0)).all():
        raise ValueError("scores contain NaN or inf; refusing to select from them")


def select_pages(scores: torch.Tensor, req_to_token: torch.Tensor, seq_lens: torch.Tensor,
                 budget_tokens: torch.Tensor, page_size: int = 1, sinks: int = 4, recent: int = 32,
                 block: int = 1024) -> Selection:
    """Keeps the best pages of each request under its budget and compacts its slot table.

    Args:
        scores: ``[num_reqs, max_len]`` non-negative token scores (float); entries past ``seq_lens`` are ignored.
        req_to_token: ``[num_reqs, max_len]`` int32 slots (SGLang's ``ReqToTokenPool.req_to_token`` rows).
        seq_lens: ``[num_reqs]`` prompt lengths.
        budget_tokens: ``[num_reqs]`` tokens to keep (rounded up to whole pages; protected pages always kept).
        page_size: tokens per page; a page is kept or freed whole.
        sinks, recent: leading / trailing tokens always kept (their pages are kept whole).
        block: tokens per step of the compaction program.

    Returns:
        :class:`Selection`.
    """
    _check(scores, req_to_token, seq_lens, budget_tokens, page_size, sinks, recent)
    num_reqs, max_len = scores.shape
    max_pages = -(-max_len // page_size)
    page_scores = torch.empty(num_reqs, max_pages, dtype=torch.float32, device=scores.device)
    block_p = 64
    _page_scores[(num_reqs, triton.cdiv(max_pages, block_p))](
        scores, seq_lens, page_scores, max_len, max_pages, sinks, recent, scores.stride(0), page_scores.stride(0),
        PAGE=page_size, PAGE_P=triton.next_power_of_2(page_size), BLOCK_P=block_p)
    num_keep = _num_keep_pages(seq_lens.long(), budget_tokens.long(), page_scores, page_size)
    keep_page = _keep_best(page_scores, num_keep)
    keep_mask = torch.empty(num_reqs, max_len, dtype=torch.int8, device=scores.device)
    compact = torch.empty_like(req_to_token)
    kept_lens = torch.empty(num_reqs, dtype=torch.int32, device=scores.device)
    _compact[(num_reqs,)](keep_page, req_to_token, seq_lens, keep_mask, compact, kept_lens, max_len,
                          keep_page.stride(0), req_to_token.stride(0), keep_mask.stride(0), compact.stride(0),
                          PAGE=page_size, BLOCK=block)
    return Selection(keep_mask.bool(), compact, kept_lens, num_keep)


def _keep_best(page_scores: torch.Tensor, num_keep: torch.Tensor) -> torch.Tensor:
    """``[num_reqs, max_pages]`` int8: 1 for the ``num_keep`` best pages (stable: ties keep the earlier page)."""
    order = torch.sort(page_scores, dim=-1, descending=True, stable=True).indices
    rank = torch.arange(page_scores.shape[1], device=page_scores.device).expand_as(order)
    chosen = (rank < num_keep[:, None]).to(torch.int8)
    return torch.zeros_like(chosen).scatter_(1, order, chosen)


def select_pages_reference(scores: torch.Tensor, seq_lens: torch.Tensor, budget_tokens: torch.Tensor,
                           page_size: int = 1, sinks: int = 4, recent: int = 32) -> torch.Tensor:
    """PyTorch definition of the token keep mask of :func:`select_pages`: ``[num_reqs, max_len]`` bool."""
    num_reqs, max_len = scores.shape
    mask = torch.zeros(num_reqs, max_len, dtype=torch.bool)
    for r in range(num_reqs):
        n, ps = int(seq_lens[r]), page_size
        num_pages = -(-n // ps)
        tok = torch.arange(n)
        protected = (tok < sinks) | (tok >= n - recent)
        page_of = tok // ps
        page_score = torch.zeros(num_pages, dtype=torch.float64).index_add_(0, page_of, scores[r, :n].double())
        page_protected = torch.zeros(num_pages, dtype=torch.bool).index_put_((page_of,), protected, accumulate=True)
        num_keep = min(num_pages, max(-(-int(budget_tokens[r]) // ps), int(page_protected.sum())))
        ranked = page_score.float().masked_fill(page_protected, float("inf"))
        kept_pages = torch.sort(ranked, descending=True, stable=True).indices[:num_keep]
        keep_page = torch.zeros(num_pages, dtype=torch.bool)
        keep_page[kept_pages] = True
        mask[r, :n] = keep_page[page_of]
    return mask


def compact_reference(keep_mask: torch.Tensor, req_to_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch definition of the compacted table: (``[num_reqs, max_len]`` kept slots then -1, ``[num_reqs]`` lengths)."""
    out = torch.full_like(req_to_token, -1)
    lens = keep_mask.sum(-1).to(torch.int32)
    for r in range(keep_mask.shape[0]):
        kept = req_to_token[r][keep_mask[r]]
        out[r, : kept.numel()] = kept
    return out, lens
