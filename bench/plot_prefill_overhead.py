"""Draws bench/gpu/prefill_overhead.py's JSON: each policy's latency over ``none`` (same server) per prompt length,
and plain SGLang's latency against ``none`` (the plugin loaded, nothing evicted); prints a markdown table.

    python -m bench.plot_prefill_overhead EVICT.json [--plain PLAIN.json] [--png docs/img/prefill_overhead.png]

``EVICT.json`` is a run with the evicting server; ``--plain`` a run with ``--no-evict`` (or the same file when one
run had both servers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.figures import pyplot, save

PLAIN = "plain"


def medians(*docs: dict) -> dict[str, dict]:
    """``"{policy}/{length}/{new_tokens}"`` -> summary row, from every document (cold warm-up rounds left out)."""
    out: dict[str, dict] = {}
    for doc in docs:
        out.update({k: v for k, v in doc["summary"].items() if k != "cold"})
    return out


def axes_of(rows: dict[str, dict]) -> tuple[list[str], list[int], list[int]]:
    """The policies (``none`` first, plain last), prompt lengths and new-token counts present in ``rows``."""
    keys = [k.split("/") for k in rows]
    policies = sorted({p for p, _, _ in keys}, key=lambda p: (p != "none", p == PLAIN, p))
    return policies, sorted({int(n) for _, n, _ in keys}), sorted({int(t) for _, _, t in keys})


def overhead(rows: dict[str, dict], policy: str, length: int, new_tokens: int) -> float | None:
    """Median latency of ``policy`` over ``none``'s at the same length and new tokens, minus 1 (``None`` when
    either is missing). For plain SGLang the sign says what loading the plugin costs: negative = plain is faster."""
    row, base = rows.get(f"{policy}/{length}/{new_tokens}"), rows.get(f"none/{length}/{new_tokens}")
    if row is None or base is None:
        return None
    return row["latency_s"] / base["latency_s"] - 1


def with_overheads(rows: dict[str, dict]) -> dict[str, dict]:
    """``rows`` with each row's ``overhead_vs_none`` (:func:`overhead`) recomputed over all of them: merged runs
    (plain SGLang's run has no ``none`` of its own)."""
    out = {}
    for key, row in rows.items():
        policy, length, new_tokens = key.split("/")
        out[key] = {**row, "overhead_vs_none": overhead(rows, policy, int(length), int(new_tokens))}
    return out


def markdown_table(summary: dict, policies, lengths, new_tokens: int) -> str:
    """Median latency (ms) per policy (rows) and prompt length (columns) at ``new_tokens``, with each row's
    ``overhead_vs_none`` (``summary``: ``"{policy}/{length}/{new_tokens}"`` -> row, as
    ``bench/gpu/prefill_overhead.py`` writes it); ``-`` where a policy has no row."""
    lines = [f"| policy ({new_tokens} new tokens) | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |",
             "|" + " --- |" * (len(lengths) + 1)]
    for p in policies:
        cells = []
        for n in lengths:
            row = summary.get(f"{p}/{n}/{new_tokens}")
            if row is None:
                cells.append("-")
            elif row["overhead_vs_none"] is None or p == "none":
                cells.append(f"{1000 * row['latency_s']:.0f}")
            else:
                cells.append(f"{1000 * row['latency_s']:.0f} ({100 * row['overhead_vs_none']:+.1f}%)")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], png: Path, title: str) -> None:
    """One panel per new-token count: overhead (%) over ``none`` against prompt length, one line per policy."""
    plt = pyplot()

    policies, lengths, new_tokens = axes_of(rows)
    fig, axes = plt.subplots(1, len(new_tokens), figsize=(5.5 * len(new_tokens), 4), squeeze=False, sharey=True)
    for ax, t in zip(axes[0], new_tokens):
        for p in policies:
            if p == "none":
                continue
            points = [(n, overhead(rows, p, n, t)) for n in lengths]
            points = [(n, 100 * o) for n, o in points if o is not None]
            if points:
                ax.plot([n // 1024 for n, _ in points], [o for _, o in points], marker="o",
                        linestyle="--" if p == PLAIN else "-", label=p)
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks([n // 1024 for n in lengths], [f"{n // 1024}K" for n in lengths])
        ax.set_xlabel("prompt tokens")
        ax.set_title(f"{t} new tokens")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("latency over policy none (%)")
    axes[0][-1].legend(fontsize=8)
    save(fig, png, title, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evict", type=Path, help="prefill_overhead.json of the evicting server")
    parser.add_argument("--plain", type=Path, help="prefill_overhead.json with plain SGLang")
    parser.add_argument("--png", type=Path)
    args = parser.parse_args(argv)
    try:
        docs = [json.loads(path.read_text()) for path in filter(None, (args.evict, args.plain))]
        rows = medians(*docs)
    except (OSError, ValueError, KeyError) as err:
        print(f"plot_prefill_overhead: cannot read the results: {err}", file=sys.stderr)
        return 2
    if not rows:
        print("plot_prefill_overhead: no measured requests in the results", file=sys.stderr)
        return 2
    policies, lengths, new_tokens = axes_of(rows)
    for t in new_tokens:
        print(markdown_table(with_overheads(rows), policies, lengths, t) + "\n")
    if args.png:
        doc = docs[0]
        plot(rows, args.png, f"{doc.get('model', '?')} on {doc.get('device', '?')}, budget "
                             f"{doc.get('settings', {}).get('budget', '?')}: medians of warm requests")
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
