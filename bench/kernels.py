"""Paged scoring kernel on the GPU: correctness at benchmark shapes, time per layer against the bytes floor.

    PYTHONPATH=<sgl-evict install> python bench/kernels.py [--out DIR]

Shapes (one request, one layer): 8 KV heads, head_dim 128, bf16 keys in a paged pool (page size 1, slots
shuffled), GQA 4 (32 query heads), 32 observation queries per query head: 128 query rows per KV head.
Scoring configs: block_n:num_warps:num_stages. Also times select_pages (10% budget, page sizes 1 and 16) and the
dapq re-rotation of the 32 x 32 observation queries.
Floor: the keys read once at the device-to-device bandwidth measured here (a large copy, bytes read + written).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import triton
from triton.testing import do_bench

from sgl_evict.kernels.paged_scoring import attention_mass_paged
from sgl_evict.kernels.rope_rerotate import RerotatePlan
from sgl_evict.kernels.selection import select_pages
from sgl_evict.rope import rope_spec
from sgl_evict.scoring import attention_probs

NUM_KV_HEADS, HEAD_DIM, GROUP, NUM_QUERIES = 8, 128, 4, 32


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def make_inputs(seq_len: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    pool = torch.randn(seq_len + 1024, NUM_KV_HEADS, HEAD_DIM, device="cuda", generator=gen).bfloat16()
    table = torch.randperm(seq_len + 1024, device="cuda", generator=gen)[:seq_len].to(torch.int32)[None]
    q = torch.randn(1, NUM_KV_HEADS * GROUP, NUM_QUERIES, HEAD_DIM, device="cuda", generator=gen).bfloat16()
    return q, pool, table, torch.tensor([seq_len], device="cuda")


def reference(q, pool, table, seq_lens):
    keys = pool[table[0].long()].transpose(0, 1)  # gather: [kv_heads, L, d]
    return attention_probs(q[0], keys, HEAD_DIM**-0.5).mean(1)


def other_kernels(inputs, seq_len: int) -> dict:
    """Times of the selection (page sizes 1 and 16, budget 10%) and dapq re-rotation kernels on the same request."""
    q, pool, table, seq_lens = inputs
    scores = torch.rand(1, seq_len, device="cuda")
    budget = torch.tensor([seq_len // 10], device="cuda")
    res = {}
    for ps in (1, 16):
        sel = select_pages(scores, table, seq_lens, budget, page_size=ps)
        kept = sel.req_to_token[0, : int(sel.kept_lens[0])]
        assert torch.equal(kept, table[0][sel.keep_mask[0]]), "compacted table differs from the keep mask"
        res[f"select_page{ps}_ms"] = do_bench(lambda: select_pages(scores, table, seq_lens, budget, page_size=ps),
                                              warmup=10, rep=100, return_mode="median")
    plan = RerotatePlan(rope_spec(HEAD_DIM, 500000.0))
    pos = torch.arange(seq_len - NUM_QUERIES, seq_len, device="cuda")
    plan.plan(pos, pos + 512)
    res["rerotate_ms"] = do_bench(lambda: plan.run(q), warmup=10, rep=100, return_mode="median")
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--seq-lens", default="4096,32768,131072")
    parser.add_argument("--configs", default="32:4:2,64:4:2,32:8:2,64:8:2,64:8:3,128:8:2",
                        help="block_n:num_warps:num_stages of the scoring kernel, comma-separated")
    args = parser.parse_args()
    configs = args.configs.split(",")
    bw = copy_bandwidth()
    rows = []
    for seq_len in [int(s) for s in args.seq_lens.split(",")]:
        # several input sets, rotated, so that small sizes do not time the L2 cache
        sets = [make_inputs(seq_len, s) for s in range(max(1, min(8, (256 << 20) // (seq_len * 2048))))]
        key_bytes = seq_len * NUM_KV_HEADS * HEAD_DIM * 2
        floor_ms = key_bytes / bw * 1e3
        ref = reference(*sets[0])
        row = {"seq_len": seq_len, "key_bytes": key_bytes, "floor_ms": floor_ms}
        for cfg in configs:
            bn, nw, ns = (int(x) for x in cfg.split(":"))
            run = lambda s: attention_mass_paged(*s[:4], HEAD_DIM**-0.5, block_n=bn, num_warps=nw, num_stages=ns)
            out = run(sets[0])
            err = ((out[0] - ref).norm() / ref.norm()).item()
            it = iter(range(10**9))
            ms = do_bench(lambda: run(sets[next(it) % len(sets)]), warmup=25, rep=200, return_mode="median")
            row[cfg] = {"ms": ms, "rel_err": err, "fraction_of_floor": floor_ms / ms}
        row["best"] = min(configs, key=lambda c: row[c]["ms"])
        row.update(other_kernels(sets[0], seq_len))
        if seq_len <= 32768:  # the reference materialises [32, 32, L] probabilities
            it = iter(range(10**9))
            row["torch_reference_ms"] = do_bench(lambda: reference(*sets[next(it) % len(sets)]), warmup=10, rep=100,
                                                 return_mode="median")
        rows.append(row)
        print(json.dumps(row), flush=True)
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python bench/kernels.py " + " ".join(sys.argv[1:]), "device": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "triton": triton.__version__, "copy_bandwidth_GBps": bw / 1e9,
           "shapes": {"num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM, "gqa_group": GROUP,
                      "queries_per_q_head": NUM_QUERIES, "dtype": "bfloat16", "page_size": 1}, "rows": rows}
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    print(f"{'seq_len':>8} {'floor ms':>9} " + " ".join(f"{c + ' ms':>12} {'%floor':>7}" for c in configs)
          + f" {'torch ms':>9}")
    for r in rows:
        cells = " ".join(f"{r[c]['ms']:12.3f} {100 * r[c]['fraction_of_floor']:6.1f}%" for c in configs)
        print(f"{r['seq_len']:8d} {r['floor_ms']:9.3f} {cells} {r.get('torch_reference_ms', float('nan')):9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
