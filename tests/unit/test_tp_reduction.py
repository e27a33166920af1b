"""Tensor parallelism on CPU: ranks holding different KV heads keep the same tokens after the score reduction.

Two gloo ranks each hold half of the KV heads (and their query heads, and for laprox their columns of W_o), as
SGLang's ``--tp 2`` splits them; each runs :func:`evict_after_prefill` with an all-reduce of the combined scores.
Every rank must punch the same holes, and those of one rank holding every head. The two-GPU run itself (issue 8) needs a machine not lent here.
"""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.evict_batch import evict_after_prefill
from sgl_evict.engine.laprox import norm_factors
from sgl_evict.engine.runtime import EngineState
from sgl_evict.kernels.paged_scoring import attention_mass_paged
from sgl_evict.selection import Budget

SEQ_LEN, KV_HEADS, GROUP, DIM, WINDOW, LAYERS, HIDDEN = 60, 4, 2, 16, 6, 2, 24


def _problem():
    """One request's keys and values per layer ``[slots, KV_HEADS, DIM]``, slot row, packed window queries and
    output projection ``[HIDDEN, KV_HEADS * GROUP * DIM]`` per layer."""
    gen = torch.Generator().manual_seed(11)
    pools = [torch.randn(SEQ_LEN + 5, KV_HEADS, DIM, generator=gen) for _ in range(LAYERS)]
    row = (torch.randperm(SEQ_LEN + 4, generator=gen)[:SEQ_LEN] + 1).to(torch.int32)
    queries = [torch.randn(SEQ_LEN, KV_HEADS * GROUP, DIM, generator=gen) for _ in range(LAYERS)]
    values = [torch.randn(SEQ_LEN + 5, KV_HEADS, DIM, generator=gen) for _ in range(LAYERS)]
    o_proj = [torch.randn(HIDDEN, KV_HEADS * GROUP * DIM, generator=gen) for _ in range(LAYERS)]
    return pools, row, queries, values, o_proj


def _evict(heads: slice, all_reduce=None, policy: str = "snapkv") -> torch.Tensor:
    """The request's row after eviction by a rank holding KV heads ``heads`` (and their query heads and, as
    SGLang's RowParallelLinear splits it, their input columns of W_o)."""
    pools, row, queries, values, o_proj = _problem()
    q_heads = slice(heads.start * GROUP, heads.stop * GROUP)
    state = EngineState()
    state.configure(EvictionConfig(policy=policy, budget=Budget(tokens=15), window=WINDOW, sinks=2))
    state.value_norm_factors = {layer: norm_factors(w[:, q_heads.start * DIM:q_heads.stop * DIM],
                                                    q_heads.stop - q_heads.start) for layer, w in enumerate(o_proj)}
    state.forward_id = 1
    state.capture.begin(1, [SEQ_LEN], "cpu")
    for layer in range(LAYERS):
        q = queries[layer][:, q_heads].reshape(SEQ_LEN, -1)
        state.capture.record(layer, q, q_heads.stop - q_heads.start, DIM, DIM ** -0.5)
    state.capture.end()
    table = row.view(1, -1).clone()
    req = SimpleNamespace(rid="r", req_pool_idx=0, cache_protected_len=0, inflight_middle_chunks=0,
                          is_retracted=False, finished=lambda: False, sampling_params=SimpleNamespace(custom_params=None))
    batch = SimpleNamespace(reqs=[req], decoding_reqs=None, seq_lens_cpu=torch.tensor([SEQ_LEN]))
    evict_after_prefill(batch, state, table, lambda layer: pools[layer][:, heads].contiguous(), lambda _: None,
                        attention_mass_paged, all_reduce,
                        value_buffer=lambda layer: values[layer][:, heads].contiguous())
    return table[0]


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def _rank(rank: int, world: int, init_file: str, out_dir: str, policy: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    per_rank = KV_HEADS // world
    row = _evict(slice(rank * per_rank, (rank + 1) * per_rank), _all_reduce, policy)
    torch.save(row, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
@pytest.mark.parametrize("policy", ["snapkv", "laprox"])
def test_two_ranks_keep_the_same_tokens_as_one(tmp_path, policy):
    single = _evict(slice(0, KV_HEADS), policy=policy)
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path), policy), nprocs=2, join=True)
    rows = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(rows[0], rows[1])
    assert torch.equal(rows[0], single)
    assert int((single >= 0).sum()) == 15  # eviction happened


@pytest.mark.parametrize("policy", ["snapkv", "laprox"])
def test_without_the_reduction_ranks_would_disagree(policy):
    # the test above would pass vacuously if half the heads chose the same tokens as all of them
    halves = [_evict(slice(0, 2), policy=policy), _evict(slice(2, 4), policy=policy)]
    assert not torch.equal(halves[0], halves[1])


def test_laprox_keep_set_depends_on_the_output_projection():
    # a rank's laprox keep-set is not snapkv's: the W_o slices it holds take part
    assert not torch.equal(_evict(slice(0, KV_HEADS), policy="laprox"), _evict(slice(0, KV_HEADS)))
