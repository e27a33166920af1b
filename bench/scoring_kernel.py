"""Paged scoring kernel on the GPU: correctness at benchmark shapes, time per layer against the bytes floor.

    PYTHONPATH=<sgl-evict install> python -m bench.scoring_kernel [--out DIR] [--v3-file OLD.py] [--ncu-probe]
    PYTHONPATH=<sgl-evict install> python -m bench.scoring_kernel --quick [--out DIR]   # 32K and 128K, lse + best two-pass
    python -m bench.scoring_kernel --plot bench/results/kernels_<date>.json docs/img/kernels_floor_h100.png

Shapes (one request, one layer): 8 KV heads, head_dim 128, bf16 keys in a paged pool (page size 1, slots shuffled),
seq_len 4K / 32K / 128K, GQA 4 (32 query heads). Two readings of "32 observation queries per KV group":
    rows32:  32 query rows per KV head (the group's queries together: 8 queries x 4 query heads)
    rows128: 128 query rows per KV head (32 queries per query head x 4), the shape measured until 2026-11-22.
Variants (``attention_mass_paged`` keyword arguments), config block_n:num_warps:num_stages:
    v3code:  kernels/paged_scoring.py of commit 991ca4a (the 2026-11-22 v3), with --v3-file
    v3:      both passes over all heads, pass 2 in pass 1's order (the 2026-11-22 schedule, current kernel code)
    flat:    same, pass 2 in reverse order (its first blocks are the ones pass 1 read last, still in L2)
    flatT:   flat, pass 2 computes keys @ queries^T (keys as the product's M dimension)
    grouped: pass 1 then pass 2 for heads_per_launch KV heads at a time (pass 2 re-reads from L2)
    lse:     row_lse given (pass 2 only, keys read once); NOT the general case: needs each row's log-sum-exp.
             Since 2026-11-24 pass 2 reads row_lse itself: the call is one kernel launch (before: 7 small
             PyTorch kernels cast the lengths and turned the LSE into normalisers first)
    lseT_p264: lseT with num_programs=264 (2 per SM of an H100) instead of 512: chunks twice as long
--quick: 32K and 128K, both shapes, the lse configs and the best two-pass config of 2026-11-23 only (< 3 min).
Times: ``graph`` replays a CUDA graph of one call (device time, launch gaps shrunk); ``eager`` calls the Python
function (host launch cost included). Each is the median of 7 repetitions of 20 back-to-back calls rotating over
input sets that together exceed L2 (no cache flush between calls, so nothing cached is reused across calls).
Floor: the keys read once (seq_len x 8 x 128 x 2 bytes) at the device-to-device bandwidth measured here (1 GiB copy,
bytes read + written).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys

import torch
import triton

from sgl_evict.kernels import paged_scoring
from sgl_evict.kernels.paged_scoring import attention_mass_paged

NUM_KV_HEADS, HEAD_DIM, GROUP = 8, 128, 4
SHAPES = {"rows32": 8, "rows128": 32}  # queries per query head; x GROUP = rows per KV head
SCALING = HEAD_DIM**-0.5


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_calls([lambda: dst.copy_(src)], n=10)
    return 2 * src.numel() / (ms * 1e-3)


def time_calls(fns, n=20, reps=7, warmup=3) -> float:
    """Median ms per call of ``n`` back-to-back calls cycling through ``fns``."""
    for i in range(warmup):
        fns[i % len(fns)]()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(n):
            fns[i % len(fns)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n)
    return statistics.median(times)


def make_inputs(seq_len: int, num_queries: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    pool = torch.randn(seq_len + 1024, NUM_KV_HEADS, HEAD_DIM, device="cuda", generator=gen).bfloat16()
    table = torch.randperm(seq_len + 1024, device="cuda", generator=gen)[:seq_len].to(torch.int32)[None]
    q = torch.randn(1, NUM_KV_HEADS * GROUP, num_queries, HEAD_DIM, device="cuda", generator=gen).bfloat16()
    return q, pool, table, torch.tensor([seq_len], device="cuda")


def reference(q, pool, table, seq_lens):
    """PyTorch, float32: mean attention per query head [num_q_heads, L] and each row's log-sum-exp."""
    keys = pool[table[0].long()].transpose(0, 1).float().repeat_interleave(GROUP, 0)  # gather: [q_heads, L, d]
    logits = torch.einsum("hqd,hkd->hqk", q[0].float(), keys) * SCALING
    lse = torch.logsumexp(logits, -1)
    return torch.softmax(logits, -1).mean(1), lse


def variants(seq_len: int, rows: int, which: str):
    """(name, config, kwargs) to run."""
    head_bytes = seq_len * HEAD_DIM * 2
    hpls = [h for h in (1, 2, 4) if h * head_bytes <= 32 << 20 and h < NUM_KV_HEADS][-2:]
    if rows == 128:
        flat, trans, grp, grp_t = ["32:8:2", "64:8:2", "32:4:3"], ["64:4:2", "64:8:2", "128:8:2"], "32:8:2", "64:4:2"
    else:
        flat, trans, grp, grp_t = ["32:4:2", "64:4:2", "128:4:2", "64:4:3"], ["64:4:2", "128:4:2", "128:8:3"], \
            "64:4:2", "128:4:2"
    if which == "quick":  # the 2026-11-23 winners: two passes, and lse (one launch now) plus its runner-up
        if rows == 128:
            return [("flatT", "128:8:2", {"transpose_pass2": True}),
                    ("lseT", "128:8:2", {"row_lse": True, "transpose_pass2": True}),
                    ("lseT_p264", "128:8:2", {"row_lse": True, "transpose_pass2": True, "num_programs": 264}),
                    ("lseT", "64:8:2", {"row_lse": True, "transpose_pass2": True})]
        return [("flat", "128:4:2", {}), ("lseT", "64:4:2", {"row_lse": True, "transpose_pass2": True}),
                ("lseT_p264", "64:4:2", {"row_lse": True, "transpose_pass2": True, "num_programs": 264}),
                ("lse", "64:4:2", {"row_lse": True})]
    if which == "final":  # filled in from the sweep's winners
        flat, trans = flat[:1], trans[:1]
    out = [("v3", "32:8:2" if rows == 128 else "32:4:2", {"reverse_pass2": False})]
    out += [("flat", c, {}) for c in flat]
    out += [("flatT", c, {"transpose_pass2": True}) for c in trans]
    for h in hpls:
        out += [(f"grouped{h}", grp, {"heads_per_launch": h}), (f"grouped{h}T", grp_t,
                                                                {"heads_per_launch": h, "transpose_pass2": True})]
        if h == 1:
            out += [(f"grouped{h}T_p264", grp_t, {"heads_per_launch": h, "transpose_pass2": True,
                                                  "num_programs": 264})]
    out += [("lse", c, {"row_lse": True}) for c in flat[:2]]
    out += [("lseT", c, {"row_lse": True, "transpose_pass2": True}) for c in trans]
    out += [("lseT_p264", trans[-1] if rows == 128 else trans[0], {"row_lse": True, "transpose_pass2": True,
                                                                    "num_programs": 264})]
    return out


def kernel_report() -> dict:
    rep = {}
    for name, k in paged_scoring.last_compiled.items():
        try:
            rep[name] = {"n_regs": k.n_regs, "n_spills": k.n_spills,
                         "wgmma": "wgmma" in k.asm.get("ptx", ""), "cp_async": "cp.async" in k.asm.get("ptx", ""),
                         "ld_v4": k.asm.get("ptx", "").count("ld.global.v4"), "shared": k.metadata.shared}
        except Exception as e:
            rep[name] = {"error": repr(e)}
    return rep


def run_case(sets, lses, ref, cfg, kw, eager: bool) -> dict:
    bn, nw, ns = (int(x) for x in cfg.split(":"))
    use_lse = kw.pop("row_lse", False)
    fn = kw.pop("fn", None)

    def call(i):
        q, pool, table, lens = sets[i]
        if fn is not None:  # the 2026-11-22 v3 module, same harness
            return fn(q, pool, table, lens, SCALING, block_n=bn, num_warps=nw, num_stages=ns)
        return attention_mass_paged(q, pool, table, lens, SCALING, block_n=bn, num_warps=nw, num_stages=ns,
                                    row_lse=lses[i] if use_lse else None, **kw)

    paged_scoring.last_compiled.clear()
    out = call(0)
    torch.cuda.synchronize()
    res = {"rel_err": ((out[0] - ref).norm() / ref.norm()).item(), "kernels": kernel_report()}
    # fresh inputs for a second check (another set), poisoned output is impossible to miss: out is torch.empty
    graphs = []
    for i in range(len(sets)):
        call(i)  # warm (allocator) before capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            call(i)
        graphs.append(g)
    res["graph_ms"] = time_calls([g.replay for g in graphs])
    if eager:
        res["eager_ms"] = time_calls([lambda i=i: call(i) for i in range(len(sets))])
    del graphs
    return res


def ncu_probe():
    """One call of each schedule at 32K and 128K for Nsight Compute (run under ncu --cache-control none)."""
    for nq in SHAPES.values():
        for seq_len in (32768, 131072):
            s = make_inputs(seq_len, nq, 0)
            for kw in ({}, {"heads_per_launch": 4 if seq_len == 32768 else 1}):
                for _ in range(2):  # the first compiles
                    torch.cuda.nvtx.range_push(f"nq{nq}_L{seq_len}_{kw}")
                    attention_mass_paged(*s, SCALING, block_n=64 if nq == 8 else 32, num_warps=4 if nq == 8 else 8,
                                         **kw)
                    torch.cuda.nvtx.range_pop()
            torch.cuda.synchronize()


def plot(results_json: str, out_png: str) -> None:
    """% of the bytes floor per shape and schedule (best config of each), from a results JSON of this script."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.load(open(results_json))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, shape in zip(axes, ("rows32", "rows128")):
        rows = [r for r in d["rows"] if r["shape"] == shape]
        x = [r["seq_len"] // 1024 for r in rows]
        def best(r, pred):
            c = {k: v for k, v in r["cases"].items() if "error" not in v and pred(k)}
            k = max(c, key=lambda k: c[k]["fraction_of_floor_graph"])
            return 100 * c[k]["fraction_of_floor_graph"], k
        series = [("v3 (2026-11-22 code), same harness", lambda k: k.startswith("v3code"), "o--", "grey"),
                  ("two passes, best config (general case)", lambda k: k.startswith("flat"), "s-", "C0"),
                  ("L2 schedule (heads_per_launch), best", lambda k: k.startswith("grouped"), "^:", "C2"),
                  ("row_lse given: one pass (needs the LSE)", lambda k: k.startswith("lse"), "D-", "C3")]
        for label, pred, style, color in series:
            ys = [best(r, pred) for r in rows]
            ax.plot(x, [y for y, _ in ys], style, color=color, label=label)
            for xi, (y, k) in zip(x, ys):
                if xi >= 32:
                    ax.annotate(f"{y:.0f}%", (xi, y), textcoords="offset points", xytext=(6, -3), fontsize=8,
                                color=color)
        ax.axhline(70, color="k", lw=0.8, ls="--")
        ax.text(4.2, 71.5, "target 70%", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{v}K" for v in x])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(f"{rows[0]['rows_per_kv_head']} query rows per KV head" +
                     (" (literal reading)" if shape == "rows32" else " (32 per query head x GQA 4)"), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% of bytes floor (keys read once at copy bandwidth)")
    axes[0].set_ylim(0, 100)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=4)
    fig.suptitle(f"Paged scoring kernel, one layer, 8 KV heads x 128, bf16 keys: {d['device']}, {d['date'][:10]}, "
                 "CUDA-graph replays", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out_png, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--seq-lens", default="4096,32768,131072")
    parser.add_argument("--shapes", default="rows32,rows128")
    parser.add_argument("--variants", default="all", choices=["all", "final", "quick"])
    parser.add_argument("--quick", action="store_true",
                        help="--seq-lens 32768,131072 --variants quick: lse configs and the best two-pass ones")
    parser.add_argument("--ncu-probe", action="store_true")
    parser.add_argument("--plot", nargs=2, metavar=("RESULTS_JSON", "PNG"), help="draw the figure and exit (CPU)")
    parser.add_argument("--v3-file", help="kernels/paged_scoring.py of commit 991ca4a (v3), timed in the same harness")
    args = parser.parse_args()
    if args.plot:
        plot(*args.plot)
        return 0
    v3_fn = None
    if args.v3_file:
        import importlib.util
        spec = importlib.util.spec_from_file_location("paged_scoring_v3", args.v3_file)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        v3_fn = mod.attention_mass_paged
    if args.ncu_probe:
        ncu_probe()
        return 0
    if args.quick:
        args.seq_lens, args.variants = "32768,131072", "quick"
    bw = copy_bandwidth()
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python -m bench.scoring_kernel " + " ".join(sys.argv[1:]), "device": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "triton": triton.__version__, "copy_bandwidth_GBps": bw / 1e9,
           "timing": "median of 7 x 20 back-to-back calls rotating input sets (> L2 together), CUDA events",
           "lse_mode": "row_lse float32 [1, 32, queries] read by pass 2 itself: one kernel launch per call",
           "shapes": {"num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM, "gqa_group": GROUP, "dtype": "bfloat16",
                      "page_size": 1, "rows_per_kv_head": {k: v * GROUP for k, v in SHAPES.items()}}, "rows": []}
    path = os.path.join(args.out, "kernels.json")
    for shape in args.shapes.split(","):
        nq = SHAPES[shape]
        rows = nq * GROUP
        for seq_len in [int(s) for s in args.seq_lens.split(",")]:
            key_bytes = seq_len * NUM_KV_HEADS * HEAD_DIM * 2
            n_sets = max(2, min(32, math.ceil((256 << 20) / key_bytes)))
            sets = [make_inputs(seq_len, nq, s) for s in range(n_sets)]
            refs = [reference(*s) for s in sets[:1]]
            ref, _ = refs[0]
            lses = []
            for s in sets:  # the row log-sum-exp the lse mode is given, from the PyTorch reference
                keys = s[1][s[2][0].long()].transpose(0, 1).float().repeat_interleave(GROUP, 0)
                lses.append(torch.logsumexp(torch.einsum("hqd,hkd->hqk", s[0][0].float(), keys) * SCALING, -1)[None])
                del keys
            torch.cuda.empty_cache()
            flops = 2 * seq_len * NUM_KV_HEADS * rows * HEAD_DIM
            row = {"shape": shape, "rows_per_kv_head": rows, "seq_len": seq_len, "key_bytes": key_bytes,
                   "floor_ms": key_bytes / bw * 1e3, "flop_per_pass": flops,
                   "exp_per_pass": seq_len * NUM_KV_HEADS * rows, "input_sets": n_sets, "cases": {}}
            cases = variants(seq_len, rows, args.variants)
            if v3_fn is not None:
                cases.insert(0, ("v3code", "32:8:2" if rows == 128 else "32:4:2", {"fn": v3_fn}))
            for name, cfg, kw in cases:
                key = f"{name}@{cfg}"
                try:
                    r = run_case(sets, lses, ref, cfg, dict(kw), eager=cfg in (
                        "32:8:2", "64:4:2") or name == "v3")
                    r["fraction_of_floor_graph"] = row["floor_ms"] / r["graph_ms"]
                    if "eager_ms" in r:
                        r["fraction_of_floor_eager"] = row["floor_ms"] / r["eager_ms"]
                    r["kwargs"] = {k: (v if k not in ("row_lse", "fn") else "given") for k, v in kw.items()}
                except Exception as e:
                    r = {"error": repr(e)[:500]}
                row["cases"][key] = r
                print(shape, seq_len, key, json.dumps(r), flush=True)
            if seq_len <= 32768:
                row["torch_reference_ms"] = time_calls([lambda s=s: reference(*s) for s in sets], n=4, reps=3)
            doc["rows"].append(row)
            with open(path, "w") as f:
                json.dump(doc, f, indent=1)
            del sets, lses, refs
            torch.cuda.empty_cache()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    print(f"{'shape':>8} {'seq':>7} {'floor us':>8} {'variant@cfg':>26} {'graph us':>9} {'%floor':>7} {'eager us':>9}"
          f" {'err':>8} regs/spills")
    for r in doc["rows"]:
        for key, c in r["cases"].items():
            if "error" in c:
                print(f"{r['shape']:>8} {r['seq_len']:7d} {'':>8} {key:>26} ERROR {c['error'][:80]}")
                continue
            ks = " ".join(f"{n[:3]}:{k.get('n_regs')}/{k.get('n_spills')}{'w' if k.get('wgmma') else ''}"
                          f"{'c' if k.get('cp_async') else ''}"
                          for n, k in c["kernels"].items())
            print(f"{r['shape']:>8} {r['seq_len']:7d} {1e3 * r['floor_ms']:8.1f} {key:>26} {1e3 * c['graph_ms']:9.1f}"
                  f" {100 * c['fraction_of_floor_graph']:6.1f}% {1e3 * c.get('eager_ms', float('nan')):9.1f}"
                  f" {c['rel_err']:8.1e} {ks}")
        if "torch_reference_ms" in r:
            print(f"{r['shape']:>8} {r['seq_len']:7d} torch reference {1e3 * r['torch_reference_ms']:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
