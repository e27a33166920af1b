"""dapq re-rotation of post-RoPE queries to target positions (Triton).

RoPE at position p is a rotation R(p), and R(a) R(b) = R(a + b), so inverse RoPE at the query's own position followed
by RoPE at the target is one rotation by ``target - source`` (see :mod:`sgl_evict.rope`). Plan/run split as in
FlashInfer: :meth:`RerotatePlan.plan` builds the ``[num_queries, rotary_dim / 2]`` cos/sin table once per (positions,
spec) from float64 angles on the host side (float32 angles lose ~1e-2 rad at 128K positions), :meth:`RerotatePlan.run`
rotates any number of heads with it in one kernel launch. The output can feed :func:`attention_mass_paged` directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sgl_evict.rope import RopeSpec


# JIT specialisation (see kernels/paged_scoring.py): the row and query counts follow the request's window (shorter for
# a prompt shorter than the window, or a per-request override) and are not specialised; ``head_dim`` is a model
# constant and stays specialised (its divisibility by 16 keeps the row loads vectorised). The tensors are fresh or
# ``.contiguous()`` copies: aligned.
REROTATE_DO_NOT_SPECIALIZE = ("num_rows", "num_queries")


@triton.jit(do_not_specialize=REROTATE_DO_NOT_SPECIALIZE)
def _rerotate(X, Cos, Sin, Out, num_rows, num_queries, head_dim,
              HALF: tl.constexpr, HALF_P: tl.constexpr, REST_P: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # rows of the flattened [..., num_queries, head_dim]
    row_ok = rows < num_rows
    qi = rows % num_queries
    j = tl.arange(0, HALF_P)
    ok = row_ok[:, None] & (j[None, :] < HALF)
    base = rows.to(tl.int64)[:, None] * head_dim
    x1 = tl.load(X + base + j[None, :], mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(X + base + HALF + j[None, :], mask=ok, other=0.0).to(tl.float32)
    c = tl.load(Cos + qi[:, None] * HALF + j[None, :], mask=ok, other=0.0)
    s = tl.load(Sin + qi[:, None] * HALF + j[None, :], mask=ok, other=0.0)
    tl.store(Out + base + j[None, :], (x1 * c - x2 * s).to(Out.dtype.element_ty), mask=ok)
    tl.store(Out + base + HALF + j[None, :], (x2 * c + x1 * s).to(Out.dtype.element_ty), mask=ok)
    if REST_P > 0:  # partial rotary: the dims past rotary_dim are copied unchanged
        r = 2 * HALF + tl.arange(0, REST_P)
        rok = row_ok[:, None] & (r[None, :] < head_dim)
        tl.store(Out + base + r[None, :], tl.load(X + base + r[None, :], mask=rok, other=0.0), mask=rok)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


class RerotatePlan:
    """Rotates post-RoPE queries from their positions to target positions (dapq), on the GPU.

    Usage::

        plan = RerotatePlan(spec)
        plan.plan(from_positions, to_positions)   # [num_queries] each
        moved = plan.run(queries)                 # [..., num_queries, head_dim] -> same shape and dtype
    """

    def __init__(self, spec: RopeSpec, block_rows: int = 32) -> None:
        self.spec = spec
        self.block_rows = block_rows
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def plan(self, from_positions: torch.Tensor, to_positions: torch.Tensor) -> None:
        """Builds the cos/sin table of the rotation by ``to - from``; both ``[num_queries]``."""
        if from_positions.shape != to_positions.shape or from_positions.dim() != 1:
            raise ValueError(f"from_positions and to_positions must both be [num_queries], got "
                             f"{tuple(from_positions.shape)} and {tuple(to_positions.shape)}")
        delta = to_positions.to(torch.float64) - from_positions.to(torch.float64)
        angles = delta[:, None] * self.spec.inv_freq.to(delta.device, torch.float64)[None, :]
        self._cos = angles.cos().float().contiguous()
        self._sin = angles.sin().float().contiguous()

    def run(self, queries: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``queries [..., num_queries, head_dim]`` rotated by the planned position differences (same dtype)."""
        if self._cos is None:
            raise ValueError("RerotatePlan.run called before plan()")
        num_queries, half = self._cos.shape
        if queries.dim() < 2 or queries.shape[-2] != num_queries or queries.shape[-1] < 2 * half:
            raise ValueError(f"queries must be [..., {num_queries}, >= {2 * half}], got {tuple(queries.shape)}")
        x = queries.contiguous()
        out = torch.empty_like(x) if out is None else out
        head_dim = x.shape[-1]
        num_rows = x.numel() // head_dim
        rest = head_dim - 2 * half
        cos, sin = self._cos.to(x.device), self._sin.to(x.device)
        _rerotate[(triton.cdiv(num_rows, self.block_rows),)](
            x, cos, sin, out, num_rows, num_queries, head_dim, HALF=half, HALF_P=_next_pow2(half),
            REST_P=_next_pow2(rest) if rest else 0, BLOCK_R=self.block_rows)
        return out


def rerotate_triton(queries: torch.Tensor, from_positions: torch.Tensor, to_positions: torch.Tensor,
                    spec: RopeSpec) -> torch.Tensor:
    """One-shot :class:`RerotatePlan`: same result as :func:`sgl_evict.rope.rerotate` (float32 arithmetic)."""
    plan = RerotatePlan(spec)
    plan.plan(from_positions, to_positions)
    return plan.run(queries)
