"""Paged scoring kernel on the GPU: correctness at benchmark shapes, time per layer against the bytes floor.

    PYTHONPATH=<sgl-evict install> python bench/kernels.py [--out DIR]

Shapes (one request, one layer): 8 KV heads, head_dim 128, bf16 keys in a paged pool (page size 1, slots
shuffled), GQA 4 (32 query heads), 32 observation queries per query head: 128 query rows per KV head.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--seq-lens", default="4096,32768,131072")
    parser.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    args = parser.parse_args()
    bw = copy_bandwidth()
    rows = []
    for seq_len in [int(s) for s in args.seq_lens.split(",")]:
        # several input sets, rotated, so that small sizes do not time the L2 cache
        sets = [make_inputs(seq_len, s) for s in range(max(1, min(8, (256 << 20) // (seq_len * 2048))))]
        key_bytes = seq_len * NUM_KV_HEADS * HEAD_DIM * 2
        floor_ms = key_bytes / bw * 1e3
        ref = reference(*sets[0])
        row = {"seq_len": seq_len, "key_bytes": key_bytes, "floor_ms": floor_ms}
        for bn in args.block_n:
            out = attention_mass_paged(*sets[0][:4], HEAD_DIM**-0.5, block_n=bn)
            err = ((out[0] - ref).norm() / ref.norm()).item()
            it = iter(range(10**9))
            ms = do_bench(lambda: attention_mass_paged(*sets[next(it) % len(sets)][:4], HEAD_DIM**-0.5, block_n=bn),
                          warmup=25, rep=200, return_mode="median")
            row[f"block{bn}"] = {"ms": ms, "rel_err": err, "fraction_of_floor": floor_ms / ms}
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
    print(f"{'seq_len':>8} {'floor ms':>9} " + " ".join(f"{'bn' + str(b) + ' ms':>10} {'%floor':>7}" for b in args.block_n)
          + f" {'torch ms':>9}")
    for r in rows:
        cells = " ".join(f"{r[f'block{b}']['ms']:10.3f} {100 * r[f'block{b}']['fraction_of_floor']:6.1f}%"
                         for b in args.block_n)
        print(f"{r['seq_len']:8d} {r['floor_ms']:9.3f} {cells} {r.get('torch_reference_ms', float('nan')):9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
