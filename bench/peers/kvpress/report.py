"""Tables (markdown, on stdout) and a plot of a kvpress comparison's JSON (bench/peers/kvpress/run.py's output).

Usage: python -m bench.peers.kvpress.report bench/results/kvpress_....json[.gz] [--plot docs/img/kvpress_....png]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
from pathlib import Path

from bench.peers.kvpress.metrics import summarise

MODES = ("question-agnostic", "default")


def _ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and its normal 95% interval over prompts (``[mean, low, high]``)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def load_json(path: Path) -> dict:
    """A comparison's JSON, plain or gzipped (``.gz``)."""
    data = Path(path).read_bytes()
    return json.loads(gzip.decompress(data) if str(path).endswith(".gz") else data)


def save_json(path: Path, doc: dict) -> None:
    """Writes ``doc`` as JSON, gzipped when ``path`` ends with ``.gz`` (200 prompts a cell make ~7 MB of JSON)."""
    text = json.dumps(doc, indent=1).encode()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(gzip.compress(text, mtime=0) if str(path).endswith(".gz") else text)


def rows_by(doc: dict) -> dict:
    """``(mode, method, budget) -> summary row`` (with ``top1_9_ci``), the two full-cache rows under budget 1.0."""
    out = {}
    for row in summarise(doc["records"], ("mode", "family", "method", "budget")):
        recs = [r for r in doc["records"] if (r["mode"], r["method"], r["budget"]) ==
                (row["mode"], row["method"], row["budget"])]
        row["top1_9_ci"] = _ci([r["top1_9"] for r in recs])
        out[(row["mode"], row["method"], row["budget"])] = row
    return out


def methods_of(doc: dict, mode: str) -> list[tuple[str, str]]:
    """``(family, method)`` of ``mode`` in run order, full cache first."""
    seen = {}
    for r in doc["records"]:
        if r["mode"] == mode:
            seen.setdefault(r["method"], r["family"])
    order = {"full": 0, "ours": 1, "kvpress": 2, "cross": 3}
    return sorted(((f, m) for m, f in seen.items()), key=lambda fm: order[fm[0]])


def _acc(row: dict) -> str:
    a = row["accuracy"]
    return f"{a['value']:.2f} [{a['low']:.2f}, {a['high']:.2f}]"


def tables(doc: dict) -> str:
    rows, budgets = rows_by(doc), [float(b) for b in doc["settings"]["budgets"].split(",")]
    lines = []
    for mode in MODES:
        lines += [f"\n**{mode}**: accuracy (exact match, 95% Wilson interval; {rows[(mode, 'full', 1.0)]['n']} "
                  "prompts) and teacher-forced\ntop-1 agreement with the full cache at positions 9-64\n",
                  "| family | method | " + " | ".join(f"acc {b:g}" for b in budgets) + " | "
                  + " | ".join(f"top-1 9+ {b:g}" for b in budgets) + " |",
                  "| --- | --- |" + " --- |" * (2 * len(budgets))]
        for family, method in methods_of(doc, mode):
            if family == "full":
                r = rows[(mode, method, 1.0)]
                lines.append(f"| full | full cache | {_acc(r)} (all budgets) |" + " |" * (len(budgets) - 1)
                             + " 1.00 |" * len(budgets))
                continue
            cells = [rows.get((mode, method, b)) for b in budgets]
            lines.append(f"| {family} | {method} | " + " | ".join(_acc(c) if c else "" for c in cells) + " | "
                         + " | ".join(f"{c['top1_9']:.3f}" if c else "" for c in cells) + " |")
    lines += ["\nFidelity, all methods: top-1 agreement at positions 1-8 / 9-64, KL(full || method) at 9-64 (nats), "
              "\nfirst answer token's agreement (position 0)\n",
              "| mode | method | budget | top-1 1-8 | top-1 9-64 | KL 9-64 | first token | kept per layer (mean) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode in MODES:
        for family, method in methods_of(doc, mode):
            if family == "full":
                continue
            for b in budgets:
                r = rows.get((mode, method, b))
                if r:
                    lines.append(f"| {mode} | {method} | {b:g} | {r['top1_1_8']:.3f} | {r['top1_9']:.3f} | "
                                 f"{r['kl_9']:.3f} | {r['first_agree']:.2f} | {r['kept_mean']:.0f} |")
    return "\n".join(lines)


def cross_table(doc: dict) -> str:
    """Keep-set overlap of our matched snapkv with SnapKVPress(w64,k5), per layer, and how often they answer alike."""
    by = {}
    for r in doc["records"]:
        by[(r["prompt"], r["method"], r["budget"])] = r
    budgets = [float(b) for b in doc["settings"]["budgets"].split(",")]
    layers = doc["compressed_layers"]
    lines = ["| ours as SnapKVPress | budget | " + " | ".join(f"overlap layer {i}" for i in layers)
             + " | same answer | top-1 9+ (ours / press) |", "| --- | --- |" + " --- |" * (len(layers) + 2)]
    for gran in ("per_layer", "uniform"):
        name = f"snapkv-as-SnapKVPress({gran})"
        for b in budgets:
            mine = [r for r in doc["records"] if r["method"] == name and r["budget"] == b]
            if not mine:
                continue
            theirs = [by[(r["prompt"], "SnapKVPress(w64,k5)", b)] for r in mine]
            ov = [sum(r["overlap"][j] for r in mine) / len(mine) for j in range(len(layers))]
            same = sum(a["output"] == t["output"] for a, t in zip(mine, theirs))
            t_m, t_t = (sum(r["top1_9"] for r in rs) / len(rs) for rs in (mine, theirs))
            lines.append(f"| {gran} | {b:g} | " + " | ".join(f"{o:.3f}" for o in ov)
                         + f" | {same}/{len(mine)} | {t_m:.3f} / {t_t:.3f} |")
    return "\n".join(lines)


def goal_table(doc: dict) -> str:
    """Each of our policies (question-agnostic) against its nearest press, and best against best, per budget:
    accuracy intervals and top-1 (9+) intervals; overlapping intervals are a tie."""
    rows, budgets = rows_by(doc), [float(b) for b in doc["settings"]["budgets"].split(",")]
    mode = "question-agnostic"

    def verdict(a, b, key):
        (am, alo, ahi), (bm, blo, bhi) = key(a), key(b)
        return "tie" if alo <= bhi and blo <= ahi else ("ours" if am > bm else "kvpress")

    acc = lambda r: (r["accuracy"]["value"], r["accuracy"]["low"], r["accuracy"]["high"])  # noqa: E731
    top = lambda r: r["top1_9_ci"]  # noqa: E731
    lines = ["| budget | ours | kvpress | accuracy (ours / press) | acc. verdict | top-1 9+ | top-1 verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for b in budgets:
        pairs = [(p, doc["nearest"].get(p)) for p in doc["ours"]["policies"]]
        ours = [(m, rows[(mode, m, b)]) for f, m in methods_of(doc, mode) if f == "ours" and (mode, m, b) in rows]
        press = [(m, rows[(mode, m, b)]) for f, m in methods_of(doc, mode) if f == "kvpress" and (mode, m, b) in rows]
        best_o = max(ours, key=lambda x: (x[1]["accuracy"]["value"], x[1]["top1_9"]))
        best_p = max(press, key=lambda x: (x[1]["accuracy"]["value"], x[1]["top1_9"]))
        for o, p in pairs + [("best: " + best_o[0], "best: " + best_p[0])]:
            ro = rows.get((mode, o.replace("best: ", ""), b))
            rp = rows.get((mode, (p or "").replace("best: ", ""), b))
            if not ro or not rp:
                continue
            lines.append(f"| {b:g} | {o} | {p} | {ro['accuracy']['value']:.2f} / {rp['accuracy']['value']:.2f} | "
                         f"{verdict(ro, rp, acc)} | {ro['top1_9']:.3f} / {rp['top1_9']:.3f} | "
                         f"{verdict(ro, rp, top)} |")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    """Accuracy (top row) and top-1 agreement at positions 9+ (bottom row) against the kept fraction, both modes;
    95% bands; one legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, budgets = rows_by(doc), [float(b) for b in doc["settings"]["budgets"].split(",")]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), sharex=True)
    ours_c = plt.get_cmap("tab10")
    press_c = plt.get_cmap("tab20b")  # other hues than ours (tab10), dashed
    handles = {}
    for col, mode in enumerate(MODES):
        families = methods_of(doc, mode)
        n_ours = n_press = 0
        for family, method in families:
            if family == "full":
                style = dict(color="black", ls=":", lw=2.2, zorder=10)
            elif family == "ours":
                style, n_ours = dict(color=ours_c(n_ours), ls="-", marker="o", lw=2), n_ours + 1
            elif family == "kvpress":
                style = dict(color=press_c(n_press % 10), ls="--", marker="s", ms=4, lw=1.1, alpha=0.85)
                n_press += 1
            else:
                continue  # the cross-check has its own table
            bs = budgets if family != "full" else [min(budgets), max(budgets)]
            cells = [rows[(mode, method, b if family != "full" else 1.0)] for b in bs]
            label = f"{method} ({'kvpress' if family == 'kvpress' else family})"
            for row, (key, lo_hi) in enumerate((("accuracy", lambda c: (c["accuracy"]["low"], c["accuracy"]["high"])),
                                                ("top1_9", lambda c: c["top1_9_ci"][1:]))):
                ax = axes[row, col]
                ys = [c["accuracy"]["value"] if key == "accuracy" else c["top1_9"] for c in cells]
                (line,) = ax.plot(bs, ys, label=label, **style)
                lows, highs = zip(*(lo_hi(c) for c in cells))
                ax.fill_between(bs, lows, highs, color=style["color"], alpha=0.07, lw=0)
                handles.setdefault(label, line)
        n = rows[(mode, "full", 1.0)]["n"]
        what = ("context compressed, then the question appended" if mode == "question-agnostic"
                else "whole prompt compressed (question inside the window)")
        axes[0, col].set_title(f"{mode}: {what}\n{n} prompts of {doc['settings']['context']} tokens", fontsize=10)
    for ax in axes[0]:
        ax.set_ylabel("accuracy, exact match\n(higher is better)")
        ax.set_ylim(-0.02, 1.02)
    for ax in axes[1]:
        ax.set_ylabel("top-1 agreement, positions 9-64\n(higher is better)")
        ax.set_xlabel("kept fraction of the compressed span (budget)")
        ax.set_xticks(budgets)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"Gemma 3 270M ({doc['device']}): ours vs kvpress {doc['versions'].get('kvpress')}; bands: 95% "
                 "(Wilson for accuracy, normal over prompts for top-1)", fontsize=11)
    fig.tight_layout(rect=(0, 0.12, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", type=Path)
    ap.add_argument("--plot", type=Path, default=None, help="PNG path (default: none)")
    args = ap.parse_args(argv)
    doc = load_json(args.json)
    print(tables(doc))
    if any(r["family"] == "cross" for r in doc["records"]):
        print("\nCross-check\n\n" + cross_table(doc))
        print("\nGoal (question-agnostic)\n\n" + goal_table(doc))
    if args.plot:
        plot(doc, args.plot)
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
