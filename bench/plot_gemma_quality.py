"""Draws bench/gpu/gemma_quality.py's JSON: task accuracy per policy and budget, server next to harness; prints a
table.

    python -m bench.plot_gemma_quality bench/results/gemma_quality_DATE.json [--png docs/img/gemma_quality.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.figures import pyplot, save

FULL = "full@full"


def rows(summary: dict) -> dict[str, dict[float, dict]]:
    """policy -> budget -> the summary row of ``policy@budget`` (all contexts), the full cache left out."""
    out: dict[str, dict[float, dict]] = {}
    for name, row in summary.items():
        if "/" in name or name == FULL:
            continue
        policy, budget = name.split("@")
        out.setdefault(policy, {})[float(budget)] = row
    return out


def markdown_table(doc: dict) -> str:
    """One row per policy: server / harness accuracy at each budget, and the two's token-exact agreement."""
    by_policy = rows(doc["summary"])
    budgets = sorted({b for r in by_policy.values() for b in r})
    head = "| policy | " + " | ".join(f"{b:g}: server / harness (agree)" for b in budgets) + " |"
    lines = [head, "|" + " --- |" * (len(budgets) + 1)]
    full = doc["summary"][FULL]
    lines.append(f"| full cache | {full['server_accuracy']:.2f} / {full['harness_accuracy']:.2f} "
                 f"({full['token_agreement']:.2f}) |" + " |" * (len(budgets) - 1))
    for policy, by_budget in sorted(by_policy.items()):
        cells = [f"{r['server_accuracy']:.2f} / {r['harness_accuracy']:.2f} ({r['token_agreement']:.2f})"
                 if (r := by_budget.get(b)) else "-" for b in budgets]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(doc: dict, png: Path) -> None:
    """Accuracy vs budget, one panel per policy: the server (solid) and the harness (dashed), the full cache
    as horizontal lines."""
    plt = pyplot()

    by_policy = rows(doc["summary"])
    full = doc["summary"][FULL]
    fig, axes = plt.subplots(1, len(by_policy), figsize=(3.2 * len(by_policy), 3.2), sharey=True, squeeze=False)
    for ax, (policy, by_budget) in zip(axes[0], sorted(by_policy.items())):
        budgets = sorted(by_budget)
        ax.plot(budgets, [by_budget[b]["server_accuracy"] for b in budgets], "o-", color="tab:blue", label="server")
        ax.plot(budgets, [by_budget[b]["harness_accuracy"] for b in budgets], "s--", color="tab:orange",
                label="HF harness")
        ax.axhline(full["server_accuracy"], color="tab:blue", lw=0.8, alpha=0.5)
        ax.axhline(full["harness_accuracy"], color="tab:orange", lw=0.8, ls="--", alpha=0.5)
        ax.set_xscale("log")
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.minorticks_off()  # a log axis labels its minor ticks over the budgets
        ax.set_title(policy)
        ax.set_xlabel("budget (fraction kept)")
    axes[0][0].set_ylabel("task accuracy (thin lines: full cache)")
    axes[0][0].legend(fontsize=8)
    save(fig, png, f"Gemma 3 270M through SGLang vs the HF harness ({doc.get('device', '?')}, "
                   f"{doc.get('compared_runs', len(doc.get('answers', {})))} runs)", dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--png", type=Path, default=None, help="PNG to write (default: next to the JSON)")
    args = parser.parse_args(argv)
    doc = json.loads(args.json.read_text())
    if "summary" not in doc:
        print(f"{args.json}: no summary (the harness comparison did not run: see its checks)", file=sys.stderr)
        return 1
    print(markdown_table(doc))
    plot(doc, args.png or args.json.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
