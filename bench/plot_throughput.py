"""Draws bench/gpu/throughput.py's JSON: throughput bars, latency percentiles, load over time; prints a table.

    python -m bench.plot_throughput bench/results/throughput_DATE.json[.gz] [--png docs/img/throughput.png]

Two runs of ``throughput.py --only plain`` and ``--only evict`` (same settings otherwise, e.g. one device call each
for a long run) are joined into one document: ``plot_throughput.py PLAIN.json EVICT.json --merged-json BOTH.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

from bench.figures import pyplot, save
from bench.throughput_readings import readings_table

COLORS = {"plain": "tab:gray", "evict": "tab:blue"}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(doc: dict) -> str:
    """One row per config: rates, latency percentiles (ms), cache hit rate, concurrency and KV use."""
    head = ("| config | req/s | output tok/s | TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) | cache hit | "
            "peak running | mean running | peak KV tokens | KV kept (evictions) | completed | errors |")
    rows = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, c in doc["configs"].items():
        s = c.get("summary")
        if s is None:
            rows.append(f"| {name} | failed: {c.get('error', '?')} |")
            continue

        def ms(key):
            return " / ".join(_fmt(None if v is None else 1000 * v, ".0f") for v in s[key].values())

        ev = c.get("evictions") or {}
        kept = f"{ev['kept_fraction']:.3f} ({ev['evicted_prefills']})" if ev.get("kept_fraction") is not None else "-"
        rows.append(f"| {name} | {_fmt(s['requests_per_s'], '.2f')} | {_fmt(s['output_tokens_per_s'], '.0f')} | "
                    f"{ms('ttft_s')} | {ms('tpot_s')} | {_fmt(s['cache_hit_rate'], '.3f')} | "
                    f"{_fmt(s['peak_running_reqs'], '.0f')} | {_fmt(s['mean_running_reqs'], '.1f')} | "
                    f"{_fmt(s['peak_used_kv_tokens'], '.0f')} | {kept} | {s['requests_completed']} | {s['errors']} |")
    if {"plain", "evict"} <= doc["configs"].keys():
        p, e = (doc["configs"][k].get("summary") for k in ("plain", "evict"))
        if p and e and p["requests_per_s"]:
            rows.append(f"\nevict / plain requests/s: {e['requests_per_s'] / p['requests_per_s']:.2f}x")
    return "\n".join(rows)


def plot_title(doc: dict) -> str:
    """Model, device and date(s); a joined document keeps each run's date under ``runs``."""
    dates = [doc["date"]] if doc.get("date") else sorted({r["date"][:10] for r in doc.get("runs", []) if r.get("date")})
    return f"{doc.get('model', '?')} ({doc.get('device', '?')}), {', '.join(dates) or '?'}"


def plot(doc: dict, path: str | Path) -> None:
    """PNG, 2x2: requests/s and output tok/s; TTFT and TPOT percentiles; running requests and KV tokens vs time."""
    plt = pyplot()

    configs = {n: c for n, c in doc["configs"].items() if c.get("summary")}
    names = list(configs)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))

    ax = axes[0][0]
    for i, (metric, label) in enumerate((("requests_per_s", "requests/s"), ("output_tokens_per_s", "output tok/s"))):
        target = ax if i == 0 else ax.twinx()
        for j, n in enumerate(names):
            value = configs[n]["summary"][metric] or 0
            x = i * (len(names) + 1) + j
            target.bar(x, value, color=COLORS.get(n), label=n if i == 0 else None, hatch="" if i == 0 else "//")
            target.annotate(f"{value:,.0f}" if value >= 100 else f"{value:.3g}", (x, value), ha="center",
                            va="bottom", fontsize=8)
        target.set_ylabel(label)
    ax.set_xticks([(len(names) - 1) / 2, len(names) + 1 + (len(names) - 1) / 2], ["requests/s", "output tok/s"])
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("throughput (left: requests/s, right: output tok/s)")

    ax = axes[0][1]
    groups = [(m, q) for m in ("ttft_s", "tpot_s") for q in ("p50", "p90", "p99")]
    width = 0.8 / max(1, len(names))
    for j, n in enumerate(names):
        s = configs[n]["summary"]
        values = [1000 * (s[m][q] or 0) for m, q in groups]
        ax.bar([g + j * width for g in range(len(groups))], values, width, color=COLORS.get(n), label=n)
    ax.set_xticks([g + width * (len(names) - 1) / 2 for g in range(len(groups))],
                  [f"{m[:4].upper()} {q}" for m, q in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.legend(fontsize=8)
    ax.set_title("latency percentiles")

    for ax, key, label in ((axes[1][0], "num_running_reqs", "running requests (server)"),
                           (axes[1][1], "num_used_tokens", "KV tokens in use (server)")):
        for n in names:
            samples = configs[n].get("samples", [])
            ts = [s["t_s"] for s in samples if s.get(key) is not None]
            ys = [s[key] for s in samples if s.get(key) is not None]
            ax.plot(ts, ys, color=COLORS.get(n), label=n)
            if key == "num_running_reqs":
                ax.plot([s["t_s"] for s in samples], [s["in_flight"] for s in samples], color=COLORS.get(n),
                        linestyle=":", label=f"{n}: in flight (client)")
        # the pool the server reports (it may be below the flag when memory is short), else the flag
        caps = [configs[n]["summary"].get("max_total_kv_tokens") for n in names]
        cap = max((c for c in caps if c), default=None) or doc.get("settings", {}).get("max_total_tokens")
        if key == "num_used_tokens" and cap:
            ax.axhline(cap, color="black", linestyle="--", label="KV pool (max total tokens)")
        ax.set_xlabel("seconds since the workload started")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    save(fig, path, plot_title(doc), dpi=110)


# settings that may differ between the runs of one comparison: which config ran, where its files went, and how long
# it was given (throughput.py shrinks the duration after a slow start anyway; each run's plan records what it got,
# and every reading is a rate)
PER_RUN_SETTINGS = {"only", "out", "deadline", "start_timeout", "no_progress", "duration"}


def merge_runs(docs: list[dict]) -> dict:
    """One document from throughput.json files that each ran other configs (``--only``) with the same settings:
    the configs side by side, each run's command, date, device, plan and wall time under ``runs``. ValueError when
    a config appears twice, or when the model, the device or a setting outside ``PER_RUN_SETTINGS`` differs."""
    first = docs[0]
    merged = {**first, "configs": {}, "runs": []}
    for doc in docs:
        for key in ("model", "device"):
            if doc[key] != first[key]:
                raise ValueError(f"runs differ in {key}: {first[key]!r} vs {doc[key]!r}")
        differ = sorted(k for k in first["settings"].keys() | doc["settings"].keys()
                        if k not in PER_RUN_SETTINGS and first["settings"].get(k) != doc["settings"].get(k))
        if differ:
            raise ValueError(f"runs differ in settings {differ}: not one comparison")
        for name, config in doc["configs"].items():
            if name in merged["configs"]:
                raise ValueError(f"config {name!r} is in more than one run")
            merged["configs"][name] = config
        merged["runs"].append({k: doc.get(k) for k in ("command", "date", "device", "versions", "plan", "wall_s")})
    for key in ("command", "date", "plan", "wall_s"):
        merged.pop(key, None)  # per run, under "runs"
    return merged


def read_doc(path: Path) -> dict:
    """A throughput JSON, or one gzipped (``.json.gz``: the large raw results kept in bench/results)."""
    data = path.read_bytes()
    return json.loads(gzip.decompress(data) if path.suffix == ".gz" else data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="throughput.json written by bench/gpu/throughput.py (several: "
                                                "runs of one comparison with --only, joined)")
    parser.add_argument("--png", help="output PNG (default: next to the (first) JSON)")
    parser.add_argument("--merged-json", help="where to write the joined document (several JSON files)")
    args = parser.parse_args(argv)
    docs = [read_doc(Path(p)) for p in args.json]
    try:
        doc = merge_runs(docs) if len(docs) > 1 else docs[0]
    except ValueError as err:
        parser.error(str(err))
    if args.merged_json:
        Path(args.merged_json).write_text(json.dumps(doc, indent=1))
    first = Path(args.merged_json or args.json[0])
    png = args.png or str((first.with_suffix("") if first.suffix == ".gz" else first).with_suffix(".png"))
    plot(doc, png)
    print(markdown_table(doc))
    readings = readings_table(doc)
    if readings:
        print(f"\nFrom the per-request records (bench/throughput_readings.py):\n{readings}")
    print(f"\nplot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
