"""dapq re-rotation kernel vs sgl_evict.rope.rerotate (CPU: interpreter; GPU: compiled)."""


import pytest
import torch

from sgl_evict.kernels.rope_rerotate import RerotatePlan, rerotate_triton
from sgl_evict.rope import rerotate, rope_spec

DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else ["cpu"]
# relative error bounds: float32 arithmetic on a float64 cos/sin table, rounded once to the output dtype
RTOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (48, 32), (256, 256)])
def test_rerotate_matches_reference(device, dtype, head_dim, rotary_dim):
    gen = torch.Generator().manual_seed(head_dim + rotary_dim)
    spec = rope_spec(rotary_dim, 10000.0)
    num_queries = 7
    q = torch.randn(3, 5, num_queries, head_dim, generator=gen).to(dtype)  # [reqs, heads, queries, dim]
    src = torch.randint(0, 131072, (num_queries,), generator=gen)
    dst = src + torch.randint(-500, 4000, (num_queries,), generator=gen)
    out = torch.full_like(q, float("nan")).to(device)  # poison: every element must be written
    plan = RerotatePlan(spec, block_rows=16)
    plan.plan(src.to(device), dst.to(device))
    plan.run(q.to(device), out=out)
    ref = rerotate(q.double(), src, dst, spec)
    assert torch.isfinite(out).all()
    assert ((out.cpu().double() - ref).norm() / ref.norm()).item() < RTOL[dtype]
    assert torch.equal(out[..., rotary_dim:].cpu(), q[..., rotary_dim:])  # partial rotary: rest copied


@pytest.mark.parametrize("device", DEVICES)
def test_rerotate_round_trip(device):
    spec = rope_spec(32, 10000.0)
    q = torch.randn(2, 4, 32).to(device)
    pos = torch.arange(4)
    there = rerotate_triton(q, pos, pos + 1000, spec)
    back = rerotate_triton(there, pos + 1000, pos, spec)
    assert torch.allclose(back, q, atol=1e-5)


def test_run_before_plan_and_bad_shapes_are_refused():
    plan = RerotatePlan(rope_spec(16, 10000.0))
    with pytest.raises(ValueError, match="before plan"):
        plan.run(torch.zeros(2, 16))
    with pytest.raises(ValueError, match="num_queries"):
        plan.plan(torch.arange(3), torch.arange(4))
    plan.plan(torch.arange(3), torch.arange(3))
    with pytest.raises(ValueError, match="queries must be"):
        plan.run(torch.zeros(4, 16))
