"""Summaries, tables and plots of quality-suite records (``records.jsonl``, :mod:`sgl_evict.quality.runner`).

Per family, prompt length and arm: accuracy with its Wilson interval; **retention**, the accuracy on the prompts the
reference (full cache) answered correctly; the paired comparison with the reference (prompts only one of the two
got right, exact McNemar p); fidelity, the greedy agreement with the reference's tokens inside laq's lookahead
horizon (the first 8 answer tokens) and beyond it; prompt tokens served from the prefix cache. Multi-turn families
also per turn, ``shared_system`` per position in its group (session 0 evicts, the others inherit).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from sgl_evict.quality.metrics import fidelity, mcnemar_p, wilson
from sgl_evict.quality.runner import LOOKAHEAD_STEPS, REFERENCE, Arm, Record, read_records
from sgl_evict.selection import Budget

#: retention a setting must reach for :func:`smallest_budgets`
TARGET_RETENTION = 0.95


def load_records(*paths: Path) -> list[Record]:
    """The records of a run (``records.jsonl`` or ``.jsonl.gz``), or of several read as one, one answer per
    request: the first without error, else the last (a resumed run may have asked a failed one again; runs
    topped up from one another hold the same records again)."""
    latest: dict[tuple, Record] = {}
    for path in paths:
        if not path.exists():
            raise ValueError(f"{path}: no such file (the runner writes records.jsonl into its --out folder)")
        for r in read_records(path):
            if r.key not in latest or latest[r.key].error is not None:
                latest[r.key] = r
    return list(latest.values())


def _cell(records: list[Record], reference: dict[tuple, Record], horizon: int) -> dict:
    """Statistics of one arm's ``records`` against the reference records of the same requests."""
    errors = [r for r in records if r.error is not None]
    ok = [r for r in records if r.error is None]
    pairs = [(reference[_ref_key(r)], r) for r in ok if _ref_key(r) in reference]
    both = sum(ref.correct and r.correct for ref, r in pairs)
    only_ref = sum(ref.correct and not r.correct for ref, r in pairs)
    only_arm = sum(r.correct and not ref.correct for ref, r in pairs)
    solved = sum(ref.correct for ref, _ in pairs)
    fid = [fidelity(r.output_ids, ref.output_ids, horizon, LOOKAHEAD_STEPS) for ref, r in pairs]
    cached = [r.cached_tokens / r.prompt_tokens for r in ok if r.cached_tokens is not None and r.prompt_tokens]
    return {
        "n": len(ok), "errors": len(errors), "first_error": errors[0].error if errors else None,
        "accuracy": wilson(sum(r.correct for r in ok), len(ok)).as_dict(),
        "retention": wilson(both, solved).as_dict(),
        "paired": {"n": len(pairs), "only_reference": only_ref, "only_arm": only_arm,
                   "mcnemar_p": mcnemar_p(only_ref, only_arm)},
        "fidelity": {
            "same_inside": _ratio(sum(f.same_inside for f in fid), sum(f.inside for f in fid)),
            "same_beyond": _ratio(sum(f.same_beyond for f in fid), sum(f.beyond for f in fid)),
            "prefix_mean": _ratio(sum(f.prefix for f in fid), len(fid)),
            "identical": _ratio(sum(f.prefix == f.horizon for f in fid), len(fid)),
        },
        "prompt_tokens_mean": _ratio(sum(r.prompt_tokens for r in ok), len(ok)),
        "cached_fraction_mean": _ratio(sum(cached), len(cached)),
    }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _ref_key(r: Record) -> tuple:
    return (r.family, r.target, r.seed, r.index, r.turn, REFERENCE)


def summarize(records: Iterable[Record], horizon: int = 64) -> dict:
    """``{"cells": {family/target/arm: stats}, "turns": {family/target/arm/turnN: stats},
    "order": {shared_system/target/arm/first|later: stats}, "pooled": {family/arm: stats},
    "smallest_budgets": ...}``."""
    records = list(records)
    reference = {r.key: r for r in records if r.arm == REFERENCE and r.error is None}
    cells, turns, order, pooled = defaultdict(list), defaultdict(list), defaultdict(list), defaultdict(list)
    for r in records:
        cells[f"{r.family}/{r.target}/{r.arm}"].append(r)
        pooled[f"{r.family}/{r.arm}"].append(r)
        if r.family in ("doc_qa", "agent_trace"):
            turns[f"{r.family}/{r.target}/{r.arm}/turn{r.turn + 1}"].append(r)
        if r.family == "shared_system":
            which = "first" if r.meta.get("order", 0) == 0 else "later"
            order[f"{r.family}/{r.target}/{r.arm}/{which}"].append(r)
    out = {name: {k: _cell(v, reference, horizon) for k, v in sorted(group.items())}
           for name, group in (("cells", cells), ("turns", turns), ("order", order), ("pooled", pooled))}
    out["smallest_budgets"] = smallest_budgets(out["pooled"])
    return out


def smallest_budgets(pooled: dict, target: float = TARGET_RETENTION) -> dict:
    """Per family and policy (arm extras kept apart), the smallest budget whose retention reaches ``target``:
    ``{"reached": budget or None, "retention": interval, "sure": lower bound >= target}``."""
    by_policy: dict[str, list[tuple[float, str, dict]]] = defaultdict(list)
    for key, stats in pooled.items():
        family, arm_name = key.split("/", 1)
        if arm_name == REFERENCE:
            continue
        arm = Arm.parse(arm_name)
        label = _policy_label(arm_name)
        budget = Budget.parse(arm.budget)
        size = budget.fraction if budget.fraction is not None else float(budget.tokens)
        by_policy[f"{family}/{label}"].append((size, arm.budget, stats["retention"]))
    out = {}
    for key, rows in sorted(by_policy.items()):
        reached = next(((b, ret) for _, b, ret in sorted(rows) if ret["n"] and ret["value"] >= target), None)
        out[key] = {"reached": reached[0] if reached else None, "retention": reached[1] if reached else None,
                    "sure": bool(reached and reached[1]["low"] >= target),
                    "tried": [b for _, b, _ in sorted(rows)]}
    return out


def kept_tokens(prompt: int, budget: str, sinks: int, protected_tail: int, window: int = 32) -> int:
    """Tokens a uniform server keeps of a ``prompt``-token prompt: the budget, or the sinks and the protected tail
    (the model's sliding window, or the window) when they are more."""
    return min(prompt, max(Budget.parse(budget).num_tokens(prompt), sinks + max(window, protected_tail)))


def _fmt(iv: dict) -> str:
    if not iv["n"]:
        return "-"
    return f"{iv['value']:.2f} [{iv['low']:.2f}, {iv['high']:.2f}] (n={iv['n']})"


def markdown_tables(summary: dict, sinks: int = 4, protected_tail: int = 0) -> str:
    """One table per family and prompt length: accuracy, retention, paired counts, fidelity, cache hits, and the
    tokens kept by full-attention layers (``protected_tail``: the server's sliding-window tail, 512 on Gemma 3)."""
    lines = []
    groups: dict[tuple, list[tuple[str, dict]]] = defaultdict(list)
    for key, stats in summary["cells"].items():
        family, target, arm = key.split("/", 2)
        groups[(family, int(target))].append((arm, stats))
    for (family, target), rows in sorted(groups.items()):
        lines += [f"\n### {family}, {target} tokens\n",
                  "| arm | accuracy [95% CI] | retention [95% CI] | only ref / only arm (p) | same tokens 1-8 / 9-64 "
                  "| identical | cached | kept (full-attention layers) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for arm, s in sorted(rows, key=lambda r: (r[0] != REFERENCE, r[0])):
            f, p = s["fidelity"], s["paired"]
            fid = "-" if arm == REFERENCE else (f"{_pct(f['same_inside'])} / {_pct(f['same_beyond'])}")
            kept = "all"
            if arm != REFERENCE and s["prompt_tokens_mean"]:
                n = round(s["prompt_tokens_mean"])
                k = kept_tokens(n, Arm.parse(arm).budget, sinks, protected_tail)
                kept = f"{k} of {n} ({k / n:.0%})"
            paired = "-" if arm == REFERENCE else f"{p['only_reference']} / {p['only_arm']} ({p['mcnemar_p']:.2g})"
            lines.append(f"| {arm} | {_fmt(s['accuracy'])} | {'-' if arm == REFERENCE else _fmt(s['retention'])} | "
                         f"{paired} | {fid} | {'-' if arm == REFERENCE else _pct(f['identical'])} | "
                         f"{_pct(s['cached_fraction_mean'])} | {kept} |"
                         + (f" {s['errors']} errors" if s["errors"] else ""))
    lines += _smallest_budget_table(summary["cells"])
    return "\n".join(lines).lstrip("\n")


def _smallest_budget_table(cells: dict) -> list[str]:
    """Per family, prompt length and policy, the smallest budget tried whose retention reaches
    :data:`TARGET_RETENTION` (the summary's ``smallest_budgets`` pools lengths, where a short prompt's protected
    tail can decide alone)."""
    by_length, order = {}, {}
    for key, stats in cells.items():
        family, target, arm = key.split("/", 2)
        by_length[f"{family}, {target} tokens/{arm}"] = stats
        order[f"{family}, {target} tokens"] = (family, int(target))
    rows = smallest_budgets(by_length)
    if not rows:
        return []
    lines = [f"\n### Smallest budget tried with retention >= {TARGET_RETENTION:.0%}\n",
             "| family, length | policy | budget | retention [95% CI] | lower bound >= target | tried |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, row in sorted(rows.items(), key=lambda kv: (order[kv[0].rsplit("/", 1)[0]], kv[0])):
        where, policy = key.rsplit("/", 1)
        reached = row["reached"] or "none"
        retention = _fmt(row["retention"]) if row["retention"] else "-"
        lines.append(f"| {where} | {policy} | {reached} | {retention} | {'yes' if row['sure'] else 'no'} | "
                     f"{', '.join(row['tried'])} |")
    return lines


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0%}"


def plot(summary: dict, path: Path) -> None:
    """Accuracy against budget with 95% bands (a panel per family and length, the full cache as a grey band),
    then, for the multi-turn families, retention per turn of every arm. A policy (with its extra fields) has one
    colour and marker in every panel, a budget one line style in the per-turn panels; one legend for all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def by_length(keys) -> list[tuple[str, str]]:
        return sorted({tuple(k.split("/")[:2]) for k in keys}, key=lambda p: (p[0], int(p[1])))

    arms = sorted({k.split("/", 2)[2] for k in summary["cells"]} - {REFERENCE})
    labels = sorted({_policy_label(a) for a in arms})
    budgets = sorted({Arm.parse(a).budget for a in arms}, key=lambda b: Budget.parse(b).fraction or 0.0)
    style = {"colour": {lab: f"C{i % 10}" for i, lab in enumerate(labels)},
             "marker": {lab: "osD^v<>p*h"[i % 10] for i, lab in enumerate(labels)},
             "dash": {b: ("-", "--", "-.", ":")[i % 4] for i, b in enumerate(budgets)}}
    panels = [("accuracy", *p) for p in by_length(summary["cells"])]
    panels += [("turns", *p) for p in by_length(summary["turns"])]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    dashes = budgets if summary["turns"] else []  # line styles mean budgets only in per-turn panels
    legend_in = 0.3 * (1 + -(-(len(labels) + len(dashes) + 1) // 4))
    height = 3.5 * rows + 0.5 + legend_in
    # at least 9 inches wide: the title and the four-column legend must fit above and below one panel
    fig, axes = plt.subplots(rows, cols, figsize=(max(9.0, 4.6 * cols), height), squeeze=False)
    for ax, (kind, family, target) in zip(axes.flat, panels):
        (_accuracy_panel if kind == "accuracy" else _turn_panel)(ax, summary, family, target, style)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color="0.85", label="full cache (95% CI)")]
    handles += [Line2D([], [], color=style["colour"][lab], marker=style["marker"][lab], label=lab) for lab in labels]
    handles += [Line2D([], [], color="0.3", ls=style["dash"][b], label=f"budget {b} (per turn)") for b in dashes]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Answers through the server against the full cache (higher is better; bands: 95% Wilson "
                 "intervals)", fontsize=9)
    fig.tight_layout(rect=(0, legend_in / height, 1, 1 - 0.35 / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _policy_label(arm: str) -> str:
    """``laq@0.1+history=keep`` -> ``laq+history=keep``: the arm without its budget."""
    return arm.replace(f"@{Arm.parse(arm).budget}", "")


def _accuracy_panel(ax, summary: dict, family: str, target: str, style: dict) -> None:
    curves: dict[str, list[tuple[float, dict]]] = defaultdict(list)
    ref = None
    for key, s in summary["cells"].items():
        fam, tgt, arm = key.split("/", 2)
        if (fam, tgt) != (family, target):
            continue
        if arm == REFERENCE:
            ref = s["accuracy"]
            continue
        curves[_policy_label(arm)].append((Budget.parse(Arm.parse(arm).budget).fraction or 0.0, s["accuracy"]))
    if ref and ref["n"]:
        ax.axhspan(ref["low"], ref["high"], color="0.85")
        ax.axhline(ref["value"], color="0.5", lw=1)
    for i, (label, pts) in enumerate(sorted(curves.items())):
        pts.sort(key=lambda p: p[0])
        # coinciding curves stay visible: x nudged apart per policy
        xs = [p[0] * (1 + 0.02 * (i - (len(curves) - 1) / 2)) for p in pts]
        ax.plot(xs, [p[1]["value"] for p in pts], marker=style["marker"][label], color=style["colour"][label],
                lw=1.2)
        ax.fill_between(xs, [p[1]["low"] for p in pts], [p[1]["high"] for p in pts], alpha=0.1,
                        color=style["colour"][label])
    ax.set_xscale("log")
    budgets = sorted({x for pts in curves.values() for x, _ in pts})
    ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
    ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{family}, {target} tokens", fontsize=9)
    ax.set_xlabel("KV budget (fraction of the prompt kept)", fontsize=8)
    ax.set_ylabel("accuracy", fontsize=8)


def _turn_panel(ax, summary: dict, family: str, target: str, style: dict) -> None:
    curves: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for key, s in summary["turns"].items():
        fam, tgt, arm, turn = key.split("/", 3)
        if (fam, tgt) == (family, target) and arm != REFERENCE:
            curves[arm].append((int(turn[len("turn"):]), s["retention"]))
    for arm, pts in sorted(curves.items()):
        pts.sort()
        label = _policy_label(arm)
        colour = style["colour"][label]
        ax.plot([p[0] for p in pts], [p[1]["value"] for p in pts], marker=style["marker"][label], color=colour,
                ls=style["dash"][Arm.parse(arm).budget], lw=1.2)
        ax.fill_between([p[0] for p in pts], [p[1]["low"] for p in pts], [p[1]["high"] for p in pts], alpha=0.06,
                        color=colour)
    ax.axhline(TARGET_RETENTION, color="0.5", ls="--", lw=0.8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{family}, {target} tokens: retention per turn", fontsize=9)
    ax.set_xlabel("turn", fontsize=8)
    ax.set_ylabel("retention (of what the full cache solves)", fontsize=8)
