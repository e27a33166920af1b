"""Fused paged scoring kernel vs the PyTorch reference (score_queries on gathered keys).

CPU: Triton interpreter (TRITON_INTERPRET=1 set before triton is imported, only without CUDA).
GPU: the same cases compiled, marked ``gpu``. Relative error bounds (||out - ref|| / ||ref||):
fp32 keys 1e-5; bf16/fp16 keys 2e-3 on the GPU (fp32 accumulation of half-precision products,
exp2 of rounded logits), 1e-5 under the interpreter (it multiplies in fp32).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sgl_evict.kernels.paged_scoring import PagedScoring, paged_scores_reference  # noqa: E402

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter run on CPU"))]
DEVICES.append(pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]))
POISON = -7.0


def _case(device, dtype, group, page_size, seq_lens, num_queries=5, num_kv_heads=2, head_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_reqs, max_len = len(seq_lens), max(seq_lens) + 3
    pages_per_req = -(-max_len // page_size)
    num_pages = num_reqs * pages_per_req + 2
    k_buffer = torch.randn(num_pages * page_size, num_kv_heads, head_dim, generator=g).to(dtype)
    # pages of each request in a random order of the pool; tokens contiguous inside a page (SGLang paging)
    pages = torch.randperm(num_pages, generator=g)[: num_reqs * pages_per_req].view(num_reqs, pages_per_req)
    tokens = torch.arange(pages_per_req * page_size)
    req_to_token = (pages[:, tokens // page_size] * page_size + tokens % page_size)[:, :max_len].int()
    queries = torch.randn(num_reqs, num_kv_heads * group, num_queries, head_dim, generator=g).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    positions = torch.stack([torch.randint(0, n, (num_queries,), generator=g) for n in seq_lens])
    to = dict(device=device)
    return queries.to(**to), k_buffer.to(**to), req_to_token.to(**to), lens.to(**to), positions.to(**to)


def _tol(device, dtype):
    return 1e-5 if device == "cpu" or dtype == torch.float32 else 2e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,group,page_size,causal",
    [
        (torch.bfloat16, 1, 1, False),
        (torch.float16, 4, 16, True),
        (torch.bfloat16, 8, 16, False),
        (torch.float32, 4, 1, True),
    ],
)
def test_scores_match_reference(device, dtype, group, page_size, causal):
    q, kb, rtt, lens, pos = _case(device, dtype, group, page_size, seq_lens=[97, 33, 150])
    scaling = q.shape[-1] ** -0.5
    scorer = PagedScoring(q.shape[1], kb.shape[1], kb.shape[2], scaling, block_n=32)
    scorer.plan(len(lens), rtt.shape[1], q.shape[2], device)
    out = torch.full((len(lens), kb.shape[1], rtt.shape[1]), POISON, device=device)
    scorer.run(q, kb, rtt, lens, query_positions=pos if causal else None, out=out)
    ref = paged_scores_reference(q, kb, rtt, lens, scaling, query_positions=pos if causal else None)
    assert not (out == POISON).any(), "kernel left elements unwritten"
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < _tol(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pooling,mode,reduce", [(5, "max", "mean"), (3, "avg", "max"), (1, "max", "sum")])
def test_pooling_value_weights_and_gqa_reduce(device, pooling, mode, reduce):
    q, kb, rtt, lens, pos = _case(device, torch.bfloat16, 4, 16, seq_lens=[61, 130], seed=1)
    scaling = q.shape[-1] ** -0.5
    vw = torch.rand(len(lens), q.shape[1], rtt.shape[1], device=device) + 0.5
    scorer = PagedScoring(q.shape[1], kb.shape[1], kb.shape[2], scaling, pooling, mode, reduce, block_n=32)
    scorer.plan(len(lens), rtt.shape[1], q.shape[2], device)
    out = torch.full((len(lens), kb.shape[1], rtt.shape[1]), POISON, device=device)
    scorer.run(q, kb, rtt, lens, query_positions=pos, value_weights=vw, out=out)
    ref = paged_scores_reference(q, kb, rtt, lens, scaling, pos, vw, pooling, mode, reduce)
    assert not (out == POISON).any()
    assert ((out - ref).norm() / ref.norm()).item() < _tol(device, torch.bfloat16)


def test_bad_shapes_raise_value_error():
    scorer = PagedScoring(8, 2, 32, 0.1)
    with pytest.raises(ValueError, match="run"):
        scorer.run(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1))
    scorer.plan(1, 16, 4, "cpu")
    with pytest.raises(ValueError, match="queries"):
        scorer.run(torch.zeros(1, 8, 3, 32), torch.zeros(16, 2, 32), torch.zeros(1, 16, dtype=torch.int32), torch.ones(1))
    with pytest.raises(ValueError, match="multiple"):
        PagedScoring(6, 4, 32, 0.1)
    with pytest.raises(ValueError, match="odd"):
        PagedScoring(8, 2, 32, 0.1, pooling_kernel=4)
