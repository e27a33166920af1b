"""Draws bench/gpu/decode_overhead.py's JSON: decode step time per server and request kind, one panel per batch
size, bars at the median over rounds with the min-max spread, plain SGLang's median as a line.

    python -m bench.plot_decode_overhead decode_overhead.json --png docs/img/decode_overhead.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.figures import pyplot, save

#: bar order: plain first, then the evicting servers without and with the overlap scheduler
ORDER = ("plain/plain", "plain-sched/plain", "evict/none", "evict/snapkv", "evict-overlap/none",
         "evict-overlap/snapkv")


def bars(summary: dict) -> tuple[list[str], list[int]]:
    """The ``config/kind`` bars (in :data:`ORDER`, unknown ones last) and batch sizes present in ``summary``."""
    keys = {k.rsplit("/", 1)[0] for k in summary}
    named = sorted(keys, key=lambda k: (ORDER.index(k) if k in ORDER else len(ORDER), k))
    return named, sorted({int(k.rsplit("/", 1)[1]) for k in summary})


def plot(summary: dict, png: Path, title: str) -> None:
    plt = pyplot()

    names, batches = bars(summary)
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        rows = [summary.get(f"{name}/{batch}") for name in names]
        x = [i for i, row in enumerate(rows) if row]
        med = [1e3 * rows[i]["median_s"] for i in x]
        low = [m - 1e3 * rows[i]["min_s"] for m, i in zip(med, x)]
        high = [1e3 * rows[i]["max_s"] - m for m, i in zip(med, x)]
        ax.bar(x, med, yerr=[low, high], capsize=3, color=["gray" if names[i].startswith("plain") else "tab:blue"
                                                           if "overlap" not in names[i] else "tab:green" for i in x])
        plain = summary.get(f"plain/plain/{batch}")
        if plain:
            ax.axhline(1e3 * plain["median_s"], color="black", linewidth=0.8, linestyle="--", label="plain SGLang")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("ms per decode step")
        ax.set_title(f"batch {batch}")
        ax.grid(axis="y", alpha=0.3)
    save(fig, png, title, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="decode_overhead.json (one call's, or merged with --merge)")
    parser.add_argument("--png", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        doc = json.loads(args.results.read_text())
        summary = doc["summary"]
    except (OSError, ValueError, KeyError) as err:
        print(f"plot_decode_overhead: cannot read the results: {err}", file=sys.stderr)
        return 2
    if not summary:
        print("plot_decode_overhead: no measured rounds in the results", file=sys.stderr)
        return 2
    plot(summary, args.png, f"{doc.get('model', '?')} shapes on {doc.get('device', '?')}: median over rounds "
                            "(min-max)\ngray plain, blue evicting, green evicting with the overlap scheduler")
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
