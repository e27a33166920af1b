"""The same quality-suite prompts answered in two runs, compared prompt by prompt.

    python -m bench.quality_pairs A.records.jsonl.gz B1.records.jsonl.gz,B2.records.jsonl.gz --labels "prefix reused" "prefilled fresh" \\
        [--families doc_qa,shared_system] [--json OUT.json] [--png OUT.png]

Two runs with the same evaluation seed ask the same conversations; a record of A pairs with the record of B with the
same family, conversation, group, turn and arm, when both had the same prompt length (a later turn carries the
reference's earlier answers, which may differ between runs on different GPUs). Pairs are split into *first* (turn 1,
or a group's first session) and *later* (the turns and sessions that can start from a cached prefix), and counted per
arm: correct in A, correct in B, correct in only one of them (exact McNemar p), Wilson intervals, and the share of A's
prompt tokens its server took from the prefix cache. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from sgl_evict.quality.metrics import mcnemar_p, wilson
from sgl_evict.quality.report import load_records
from sgl_evict.quality.runner import Record


def _key(r: Record) -> tuple:
    return (r.family, r.index, r.group, r.turn, r.arm)


def _position(r: Record) -> str:
    if r.family == "shared_system":
        return "first" if r.meta.get("order", 0) == 0 else "later"
    return "first" if r.turn == 0 else "later"


def compare(a: list[Record], b: list[Record], families: set[str] | None = None) -> dict:
    """``{family/arm/first|later: counts}`` over the prompts both runs answered without error."""
    by_key = {_key(r): r for r in b if r.error is None}
    groups: dict[str, list[tuple[Record, Record]]] = defaultdict(list)
    for r in a:
        other = by_key.get(_key(r))
        if r.error is not None or other is None or other.prompt_tokens != r.prompt_tokens:
            continue
        if families and r.family not in families:
            continue
        groups[f"{r.family}/{r.arm}/{_position(r)}"].append((r, other))
    out = {}
    for name, pairs in sorted(groups.items()):
        n = len(pairs)
        only_a = sum(x.correct and not y.correct for x, y in pairs)
        only_b = sum(y.correct and not x.correct for x, y in pairs)
        cached = [x.cached_tokens / x.prompt_tokens for x, _ in pairs if x.cached_tokens is not None]
        out[name] = {"n": n, "a": wilson(sum(x.correct for x, _ in pairs), n).as_dict(),
                     "b": wilson(sum(y.correct for _, y in pairs), n).as_dict(),
                     "only_a": only_a, "only_b": only_b, "mcnemar_p": mcnemar_p(only_a, only_b),
                     "a_cached_fraction": sum(cached) / len(cached) if cached else None}
    return out


def markdown_table(rows: dict, labels: tuple[str, str]) -> str:
    lines = [f"| family / arm / turns | n | {labels[0]} | {labels[1]} | only {labels[0]} / only {labels[1]} (p) "
             f"| cached ({labels[0]}) |", "| --- | --- | --- | --- | --- | --- |"]
    for name, s in rows.items():
        a, b = s["a"], s["b"]
        cached = "-" if s["a_cached_fraction"] is None else f"{s['a_cached_fraction']:.0%}"
        lines.append(f"| {name} | {s['n']} | {a['k']} ({a['value']:.2f} [{a['low']:.2f}, {a['high']:.2f}]) | "
                     f"{b['k']} ({b['value']:.2f} [{b['low']:.2f}, {b['high']:.2f}]) | "
                     f"{s['only_a']} / {s['only_b']} ({s['mcnemar_p']:.2g}) | {cached} |")
    return "\n".join(lines)


def plot(rows: dict, labels: tuple[str, str], path: Path) -> None:
    """Accuracy of both runs per arm on the later turns, one panel per family, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    later = {k: v for k, v in rows.items() if k.endswith("/later")}
    families = sorted({k.split("/")[0] for k in later})
    fig, axes = plt.subplots(1, max(1, len(families)), figsize=(max(9.0, 4.8 * len(families)), 4.2), squeeze=False)
    for ax, family in zip(axes.flat, families):
        names = [k for k in later if k.startswith(family + "/")]
        arms = [k.split("/")[1] for k in names]
        for j, (side, colour) in enumerate((("a", "C3"), ("b", "C0"))):
            xs = [i + (j - 0.5) * 0.35 for i in range(len(names))]
            vals = [later[k][side] for k in names]
            ax.bar(xs, [v["value"] for v in vals], width=0.35, color=colour, label=labels[j],
                   yerr=[[max(0.0, v["value"] - v["low"]) for v in vals],  # the bounds round below 1.0
                         [max(0.0, v["high"] - v["value"]) for v in vals]], capsize=3)
        ax.set_xticks(range(len(names)), arms, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy on later turns", fontsize=8)
        ax.set_title(f"{family}: later turns, same prompts", fontsize=9)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("Later turns answered in two runs (higher is better; bars: 95% Wilson intervals)", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load(paths: str) -> list[Record]:
    return [r for p in paths.split(",") if p for r in load_records(Path(p))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="records of run A (records.jsonl or .jsonl.gz; several: comma-separated)")
    parser.add_argument("b", help="records of run B (likewise)")
    parser.add_argument("--labels", nargs=2, default=("A", "B"), metavar=("A", "B"))
    parser.add_argument("--families", default="", help="comma-separated (default: all)")
    parser.add_argument("--json", type=Path, help="write the comparison here")
    parser.add_argument("--png", type=Path, help="draw the later turns here")
    args = parser.parse_args(argv)
    try:
        rows = compare(_load(args.a), _load(args.b),
                       set(args.families.split(",")) if args.families else None)
    except ValueError as err:
        print(f"quality_pairs: {err}", file=sys.stderr)
        return 2
    if not rows:
        print("quality_pairs: no prompt of A has a twin in B (same seed, conversation, turn, arm and length)",
              file=sys.stderr)
        return 1
    labels = tuple(args.labels)
    print(markdown_table(rows, labels))
    if args.json:
        args.json.write_text(json.dumps({"a": str(args.a), "b": str(args.b), "labels": labels, "rows": rows},
                                        indent=1))
    if args.png:
        plot(rows, labels, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
