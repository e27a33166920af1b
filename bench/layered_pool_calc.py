"""Memory arithmetic for per-layer KV budgets (issue 9, docs/design.md "Per-layer budgets: a layered KV pool").

Pure Python, no torch. For one prompt it compares what a keep-set frees:

- in SGLang's pool today (one slot holds a token's KV for every layer, so a token is freed only when *every*
  layer drops it: memory = |union of the per-layer keep-sets| x all layers), and
- in a layered pool (each layer, or group of layers, frees what it drops: memory = sum of per-layer keep-sets),

plus the mapping tables a layered pool adds. The union of per-layer keep-sets is not known without scores, so
three numbers bound it: ``nested`` (the sets are nested: union = the largest set, the best case for today's
pool), ``independent`` (unprotected tokens kept independently at each layer's rate, a rough middle: real keep-sets
are positively correlated, so real unions are smaller) and ``disjoint`` (the worst case).

    python -m bench.layered_pool_calc                       # Llama-3.1-8B, 32K prompt, 10%, uniform vs pyramid
    python -m bench.layered_pool_calc --prompt 8192 --budget 0.2 --top 0.3 --bottom 0.1
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

KIB, MIB, GIB = 1024, 1024**2, 1024**3


@dataclass(frozen=True)
class Model:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2  # bf16

    def bytes_per_token_layer(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def bytes_per_token(self) -> int:
        """K and V of one token in every layer: one slot of SGLang's MHATokenToKVPool."""
        return self.num_layers * self.bytes_per_token_layer()


LLAMA_31_8B = Model("Llama-3.1-8B", num_layers=32, num_kv_heads=8, head_dim=128)


def budget_tokens(fraction: float, prompt: int) -> int:
    """Kept tokens of a layer, as ``Budget.num_tokens`` rounds a fraction (ceil, at least 1)."""
    return min(prompt, max(1, math.ceil(fraction * prompt)))


def linear_split(num_layers: int, bottom: float, top: float) -> list[float]:
    """Per-layer fractions falling linearly from layer 0 (``bottom``) to the last layer (``top``)
    (a PyramidKV-like shape; the mean is ``(bottom + top) / 2``)."""
    if num_layers == 1:
        return [(bottom + top) / 2]
    return [bottom + (top - bottom) * i / (num_layers - 1) for i in range(num_layers)]


def union_tokens(kept: list[int], prompt: int, protected: int) -> dict[str, float]:
    """Bounds on the number of tokens kept by at least one layer (protected tokens are in every set)."""
    free = prompt - protected
    extra = [max(0, k - protected) for k in kept]
    miss = 1.0
    for e in extra:
        miss *= 1.0 - (e / free if free else 0.0)
    return {
        "nested": float(protected + max(extra, default=0)),
        "independent": protected + free * (1.0 - miss),
        "disjoint": float(min(prompt, protected + sum(extra))),
    }


def mapping_bytes(num_logical: int, num_groups: int, page_size: int = 1, entry_bytes: int = 4) -> int:
    """Logical -> physical tables: one int32 per logical page and layer group."""
    return math.ceil(num_logical / page_size) * num_groups * entry_bytes


def report(model: Model, prompt: int, fractions: list[float], protected: int) -> dict[str, float]:
    """Bytes kept for one prompt: today (union x all layers) and in a layered pool (sum of per-layer sets)."""
    kept = [max(budget_tokens(f, prompt), protected) for f in fractions]
    per_layer = model.bytes_per_token_layer()
    union = union_tokens(kept, prompt, protected)
    out = {f"today_{k}": v * model.bytes_per_token() for k, v in union.items()}
    out["layered"] = float(sum(kept) * per_layer)
    out["full"] = float(prompt * model.bytes_per_token())
    out["layer_tokens"] = float(sum(kept))
    return out


def _fmt(b: float) -> str:
    if b >= GIB:
        return f"{b / GIB:.2f} GiB"
    return f"{b / MIB:.1f} MiB" if b >= MIB else f"{b / KIB:.0f} KiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=int, default=32768)
    p.add_argument("--budget", type=float, default=0.1, help="mean kept fraction per layer")
    p.add_argument("--bottom", type=float, default=0.18, help="pyramid: fraction kept by layer 0")
    p.add_argument("--top", type=float, default=0.02, help="pyramid: fraction kept by the last layer")
    p.add_argument("--protected", type=int, default=36, help="sinks + window, kept by every layer")
    p.add_argument("--pool-gib", type=float, default=56.0, help="KV pool size, for the mapping-table overhead")
    p.add_argument("--logical-factor", type=int, default=8, help="logical slots = factor x physical token slots")
    args = p.parse_args(argv)

    m = LLAMA_31_8B
    n = args.prompt
    print(f"{m.name}: {m.bytes_per_token_layer()} B per token per layer, "
          f"{m.bytes_per_token() // KIB} KiB per token (all {m.num_layers} layers); "
          f"{n}-token prompt, full KV {_fmt(n * m.bytes_per_token())}")
    splits = {
        f"uniform {args.budget:g} (one keep-set)": None,
        f"per_layer {args.budget:g} each": [args.budget] * m.num_layers,
        f"pyramid {args.bottom:g}..{args.top:g}": linear_split(m.num_layers, args.bottom, args.top),
    }
    print("| split | layer-tokens kept | layered pool | today: nested | today: independent | today: disjoint |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, fr in splits.items():
        if fr is None:  # one keep-set: union = the set itself
            k = max(budget_tokens(args.budget, n), args.protected)
            b = k * m.bytes_per_token()
            print(f"| {name} | {k * m.num_layers} | {_fmt(b)} | {_fmt(b)} | {_fmt(b)} | {_fmt(b)} |")
            continue
        r = report(m, n, fr, args.protected)
        print(f"| {name} | {int(r['layer_tokens'])} | {_fmt(r['layered'])} | {_fmt(r['today_nested'])} | "
              f"{_fmt(r['today_independent'])} | {_fmt(r['today_disjoint'])} |")
    physical = int(args.pool_gib * GIB) // m.bytes_per_token()
    logical = physical * args.logical_factor
    print(f"\nmapping tables for a {args.pool_gib:g} GiB pool ({physical} token slots, {logical} logical slots):")
    for groups, page in ((m.num_layers, 1), (m.num_layers, 16), (4, 1), (4, 16)):
        b = mapping_bytes(logical, groups, page)
        print(f"  {groups} groups, page {page}: {_fmt(b)} ({b / (args.pool_gib * GIB):.2%} of the pool); "
              f"per {n}-token prompt {_fmt(mapping_bytes(n, groups, page))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
