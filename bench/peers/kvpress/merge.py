"""Joins the JSONs of a sharded kvpress comparison (``run.py --shard K/N``, one process per shard) into one file
with the layout of an unsharded run, and prints its tables.

Usage: python -m bench.peers.kvpress.merge --out OUT.json[.gz] SHARD.json [SHARD.json ...] [--plot PNG]

The shards must come from one setting (context, budgets, seed, methods, shard count N; the prompt count may have
grown between calls that resumed them, the largest is kept); a shard that is missing or unfinished is allowed (the
file's ``shards`` says which prompts are there); a prompt found twice is an error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.peers.kvpress.metrics import summarise
from bench.peers.kvpress.report import load_json, save_json

SAME = ("what", "settings", "seeds", "ours", "presses", "compressed_layers", "nearest")


def _index(key: str) -> int:
    """The prompt's index, the last field of its key (``single/2048/20261205/17`` -> 17)."""
    try:
        return int(key.rsplit("/", 1)[-1])
    except ValueError:
        return 0


def merge(docs: list[dict], names: list[str] | None = None) -> dict:
    """One document from the shards' documents (see the module's doc)."""
    if not docs:
        raise ValueError("no shard to merge")
    names = names or [f"shard file {i}" for i in range(len(docs))]
    first = docs[0]
    def same(doc: dict, key: str):
        # the prompt count may grow between calls that resume a run (a shard rewrites it with its next prompt)
        return {k: v for k, v in doc[key].items() if k != "prompts"} if key == "settings" else doc.get(key)

    for name, doc in zip(names, docs):
        for key in SAME:
            if same(doc, key) != same(first, key):
                raise ValueError(f"{name}: {key} differs from {names[0]}'s: {same(doc, key)!r} vs {same(first, key)!r}")
    shards = [tuple(d.get("shard") or (0, 1)) for d in docs]
    counts = {n for _, n in shards}
    if len(counts) != 1:
        raise ValueError(f"shards of different counts N: {sorted(counts)}")
    if len(set(shards)) != len(shards):
        raise ValueError(f"a shard is given twice: {sorted(shards)}")
    n = counts.pop()
    out = {k: v for k, v in first.items() if k not in ("shard", "prompts", "records", "summary")}
    seen: dict[str, str] = {}
    prompts, records = [], []
    for name, doc in zip(names, docs):
        for p in doc["prompts"]:
            if p["key"] in seen:
                raise ValueError(f"prompt {p['key']} is in {seen[p['key']]} and in {name}")
            seen[p["key"]] = name
        done = {p["key"] for p in doc["prompts"]}
        prompts += doc["prompts"]
        # a record whose prompt is not listed belongs to a prompt the shard did not finish: left out
        records += [r for r in doc["records"] if r["prompt"] in done]
    order = {p["key"]: i for i, p in enumerate(sorted(prompts, key=lambda p: _index(p["key"])))}
    out["prompts"] = sorted(prompts, key=lambda p: order[p["key"]])
    out["records"] = sorted(records, key=lambda r: order[r["prompt"]])
    out["summary"] = summarise(out["records"])
    out["sweep"] = next((d["sweep"] for d in docs if d.get("sweep")), None)
    out["commands"] = [c for d in docs for c in d.get("commands", [])]
    commits = []
    for d in docs:
        for c in d["git_commit"] if isinstance(d.get("git_commit"), list) else [d.get("git_commit")]:
            if c not in commits:
                commits.append(c)
    out["git_commit"] = commits[0] if len(commits) == 1 else commits
    devices = sorted({str(d.get("device")) for d in docs})
    out["device"] = devices[0] if len(devices) == 1 else devices
    expected = max(d["settings"]["prompts"] for d in docs)
    out["settings"] = dict(first["settings"], prompts=expected)
    out["shards"] = {"n": n, "merged": sorted(k for k, _ in shards),
                     "missing": sorted(set(range(n)) - {k for k, _ in shards}),
                     "prompts": len(out["prompts"]), "prompts_asked": expected,
                     "per_shard": {f"{k}/{n}": len(d["prompts"]) for (k, _), d in zip(shards, docs)}}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shards", nargs="+", type=Path, help="the shards' JSON files")
    ap.add_argument("--out", type=Path, required=True, help="the joined JSON (gzipped if it ends with .gz)")
    ap.add_argument("--plot", type=Path, default=None, help="PNG path (default: none)")
    args = ap.parse_args(argv)
    docs = [load_json(p) for p in args.shards]
    doc = merge(docs, [p.name for p in args.shards])
    doc["merged_by"] = " ".join(["python", "-m", "bench.peers.kvpress.merge", *(argv or sys.argv[1:])])
    save_json(args.out, doc)
    s = doc["shards"]
    print(f"[kvpress] merged {len(docs)} of {s['n']} shards, {s['prompts']} of {s['prompts_asked']} prompts "
          f"-> {args.out}", file=sys.stderr)
    if doc["records"]:
        from bench.peers.kvpress import report

        print(report.tables(doc))
        if any(r["family"] == "cross" for r in doc["records"]):
            print("\nCross-check\n\n" + report.cross_table(doc) + "\n\nGoal (question-agnostic)\n\n"
                  + report.goal_table(doc))
        if args.plot:
            report.plot(doc, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
