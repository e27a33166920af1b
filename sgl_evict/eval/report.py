"""Aggregates evaluation records into a table, a JSON document and a score-vs-budget plot."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

from sgl_evict.eval.runner import FULL, RunRecord, records_to_dicts
from sgl_evict.quality.metrics import wilson_bounds
from sgl_evict.selection import Budget

METRICS = ("score", "top1", "kl")
_LABELS = {"score": "task accuracy (string match), higher is better",
           "top1": "top-1 agreement with full cache, higher is better",
           "kl": "KL(full || compressed), nats, lower is better"}


def summarize(records: list[RunRecord]) -> dict[str, dict[str, dict[str, float]]]:
    """``{policy: {budget: {"score", "top1", "kl", "kept_fraction", "n"}}}`` means over samples and tasks."""
    groups: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for r in records:
        groups[(r.policy, r.budget)].append(r)
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for (policy, budget), rs in groups.items():
        out[policy][budget] = {
            **{m: mean(getattr(r, m) for r in rs) for m in METRICS},
            "kept_fraction": mean(mean(r.kept_tokens) / r.seq_len for r in rs),
            "n": len(rs),
        }
    return dict(out)


def _budget_value(budget: str) -> float:
    """A budget label as a number: the fraction, or the token count."""
    b = Budget.parse(budget)
    return b.fraction if b.fraction is not None else float(b.tokens)


def _budget_order(budgets) -> list[str]:
    return sorted((b for b in budgets if b != FULL), key=_budget_value)


def format_table(summary: dict, metric: str = "score") -> str:
    """Plain-text table: one row per policy, one column per budget, plus the full-cache ceiling."""
    budgets = _budget_order({b for per in summary.values() for b in per})
    policies = [p for p in summary if p != FULL]
    head = f"{_LABELS[metric]}"
    rows = [["policy"] + [f"{b}" for b in budgets]]
    for p in policies:
        rows.append([p] + [f"{summary[p][b][metric]:.3f}" if b in summary[p] else "-" for b in budgets])
    if FULL in summary:
        ceiling = summary[FULL][FULL][metric]
        rows.append(["full cache"] + [f"{ceiling:.3f}"] * len(budgets))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head, "  ".join(c.ljust(w) for c, w in zip(rows[0], widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows[1:]]
    return "\n".join(lines)


def load_json(path: str | Path) -> tuple[dict, list[RunRecord]]:
    """Reads a file written by :func:`write_json`: ``(document, records)``."""
    doc = json.loads(Path(path).read_text())
    return doc, [RunRecord(**r) for r in doc["records"]]


def write_json(path: str | Path, config: dict, records: list[RunRecord], extra: dict | None = None) -> None:
    doc = {"config": config, **(extra or {}), "summary": summarize(records), "records": records_to_dicts(records)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1))


def plot(summary: dict, path: str | Path, title: str) -> None:
    """PNG with one panel per metric: score vs KV budget, one line per policy, full cache dashed; accuracy with the
    95% Wilson band of each mean over its samples, one legend for all panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = _budget_order({b for per in summary.values() for b in per})
    x = [_budget_value(b) for b in budgets]
    as_fraction = all(Budget.parse(b).fraction is not None for b in budgets)
    from matplotlib.ticker import NullFormatter, NullLocator

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    policies = [p for p in summary if p != FULL]
    markers, styles = "osD^vP*X", ["-", "--", "-.", ":"]
    for ax, metric in zip(axes, METRICS):
        for i, policy in enumerate(policies):
            per = summary[policy]
            ys = [per[b][metric] if b in per else float("nan") for b in budgets]
            # distinct marker and dash per policy, x nudged apart: equal results must not hide each other
            xs = [v * (1 + 0.03 * (i - (len(policies) - 1) / 2)) for v in x]
            line, = ax.plot(xs, ys, marker=markers[i % len(markers)], linestyle=styles[i % len(styles)],
                            label=policy, alpha=0.85)
            if metric == "score":
                bands = [_band(per[b]) if b in per else (float("nan"), float("nan")) for b in budgets]
                ax.fill_between(xs, [lo for lo, _ in bands], [hi for _, hi in bands], color=line.get_color(),
                                alpha=0.1)
        if FULL in summary:
            ax.axhline(summary[FULL][FULL][metric], color="black", linestyle="--", label="full cache")
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.set_xlabel("KV budget (fraction of prompt kept)" if as_fraction else "KV budget (tokens kept)")
        ax.set_ylabel(_LABELS[metric])
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8)
    fig.suptitle(title + "; bands: 95% Wilson intervals of accuracy")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _band(cell: dict) -> tuple[float, float]:
    """The 95% Wilson interval of a cell's mean score over its ``n`` samples (a partial string match counts as
    that fraction of a success)."""
    return wilson_bounds(cell["score"], cell["n"])
