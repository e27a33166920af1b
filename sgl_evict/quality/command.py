"""``sgl-evict quality``: the quality suite against a running SGLang server, and its report."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

from sgl_evict import __version__

DEFAULT_ARMS = ("snapkv@0.1", "laq@0.1", "snapkv@0.2", "laq@0.2")


def add_parser(sub) -> None:
    from sgl_evict.cli import _csv  # here: sgl_evict.cli imports this module
    from sgl_evict.quality.runner import QualityConfig
    from sgl_evict.quality.tasks import FAMILIES

    d = QualityConfig()
    p = sub.add_parser(
        "quality", help="measure answer quality through a running SGLang server (single- and multi-turn tasks)",
        description="Sends seeded single- and multi-turn tasks to a running SGLang server (with sgl-evict), under "
                    "the full cache (per request {\"policy\": \"none\"}, or a plain server given by "
                    "--reference-url) and under every arm, and reports accuracy with 95% Wilson intervals, "
                    "retention of what the full cache solves, paired counts and token fidelity. Records are "
                    "written as they finish (--resume continues a run); --report redraws the tables and plot.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:30000", help="the evicting SGLang server")
    p.add_argument("--tokenizer", default=None,
                   help="the served model's tokenizer: a local HF folder, or 'gemma3-270m' (the bundled model's, "
                        "converted by `sgl-evict eval` on first use); prompts go to the server as token ids")
    p.add_argument("--reference-url", default=None,
                   help="a plain SGLang server of the same model for the reference answers (if not given: the "
                        "evicting server with {\"policy\": \"none\"} per request)")
    p.add_argument("--families", type=_csv, default=d.families, help=f"comma-separated, from: {', '.join(FAMILIES)}")
    p.add_argument("--contexts", type=lambda s: [int(x) for x in _csv(s)], default=d.contexts,
                   help="comma-separated prompt lengths in tokens (a multi-turn conversation's last turn)")
    p.add_argument("--samples", type=int, default=d.samples, help="conversations per family and length")
    p.add_argument("--arms", type=_csv, default=list(DEFAULT_ARMS),
                   help="comma-separated policy@budget, with extra kv_evict fields as +key=value "
                        "(e.g. laq@0.1+history=keep)")
    p.add_argument("--seed", type=int, default=d.seed, help="task seed (use your own for evaluation)")
    p.add_argument("--turns", type=int, default=d.turns, help="turns of doc_qa and agent_trace conversations")
    p.add_argument("--group-size", type=int, default=d.group_size, help="sessions per shared_system group")
    p.add_argument("--horizon", type=int, default=d.horizon, help="answer tokens generated and compared")
    p.add_argument("--answer-tokens", type=int, default=d.answer_tokens,
                   help="answer tokens scored and carried into the next turn (cut at a new line)")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="conversations in flight")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds after which no new turn starts (what was asked stays recorded; --resume goes on)")
    p.add_argument("--protected-tail", type=int, default=0,
                   help="the server's protected sliding-window tail (512 for Gemma 3), for the kept-KV column")
    p.add_argument("--out", default="runs/quality", help="folder for records.jsonl, quality.json/.md/.png")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--report", action="store_true", help="only summarize the records in --out (no requests)")
    p.add_argument("--records", type=_csv, default=[],
                   help="with --report: summarize these records files (.jsonl or .jsonl.gz, comma-separated, merged "
                        "one answer per request) instead of --out's records.jsonl; the report goes to --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _tokens(name: str | None):
    from sgl_evict.quality.runner import Tokens

    if not name:
        raise ValueError("--tokenizer: give the served model's tokenizer (a local HF folder, or 'gemma3-270m')")
    from transformers import AutoTokenizer

    if name == "gemma3-270m":
        from sgl_evict.harness.models import DEFAULT_CACHE, load_gemma3_270m

        if not (DEFAULT_CACHE / "tokenizer.json").is_file():
            load_gemma3_270m()
        return Tokens(AutoTokenizer.from_pretrained(DEFAULT_CACHE, local_files_only=True))
    path = Path(name)
    if not path.is_dir():
        raise ValueError(f"--tokenizer: {name!r} is neither 'gemma3-270m' nor a local folder")
    try:
        return Tokens(AutoTokenizer.from_pretrained(path, local_files_only=True))
    except (OSError, ValueError) as err:
        raise ValueError(f"--tokenizer: {path} holds no tokenizer HF can load ({str(err).splitlines()[0]})") from None


def run(args) -> int:
    from sgl_evict.quality.client import ServerError, SGLangClient
    from sgl_evict.quality.report import load_records, markdown_tables, plot, summarize
    from sgl_evict.quality.runner import Arm, QualityConfig, plan_jobs, requests_in, run_quality

    out = Path(args.out)
    if args.records and not args.report:
        raise ValueError("--records: summarizes existing records, so it goes with --report")
    missing = [f for f in args.records if not Path(f).is_file()]
    if missing:
        raise ValueError(f"--records: no such file: {', '.join(missing)}")
    config = QualityConfig(families=args.families, contexts=args.contexts, samples=args.samples,
                           arms=[Arm.parse(a) for a in args.arms], seed=args.seed, turns=args.turns,
                           group_size=args.group_size, horizon=args.horizon, answer_tokens=args.answer_tokens,
                           concurrency=args.concurrency, deadline_s=args.deadline)
    meta = {}
    if not args.report:
        config.validate()
        tokens = _tokens(args.tokenizer)
        client = SGLangClient(args.url)
        reference = SGLangClient(args.reference_url) if args.reference_url else None
        info = client.server_info()
        if not info:
            raise ValueError(f"--url: no SGLang server answers at {args.url} (/get_server_info)")
        jobs = plan_jobs(config)
        total = requests_in(jobs, config)
        print(f"quality: {len(jobs)} jobs, {total} requests to {args.url}", file=sys.stderr)
        bar = _progress(total, args.no_progress)
        start = time.time()
        try:
            run_quality(config, client, tokens, out, reference, args.resume, bar.update if bar else None)
        except ServerError as err:
            raise ValueError(f"{err}; records so far are in {out / 'records.jsonl'} (--resume continues)") from None
        finally:
            if bar:
                bar.close()
        meta = {"command": "sgl-evict " + " ".join(args.argv), "server": args.url,
                "reference_server": args.reference_url, "server_args": _server_args(info),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.time() - start, 1),
                "versions": {"sgl_evict": __version__, "python": platform.python_version(),
                             "sglang": info.get("version")},
                "config": {**{k: v for k, v in vars(config).items() if k != "arms"},
                           "arms": [a.name for a in config.arms]}}
    records = load_records(*([Path(f) for f in args.records] or [out / "records.jsonl"]))
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(records, config.horizon)
    previous = out / "quality.json"
    if args.report and previous.exists():
        meta = {k: v for k, v in json.loads(previous.read_text()).items() if k != "summary"}
    (out / "quality.json").write_text(json.dumps({**meta, "summary": summary}, indent=1))
    tables = markdown_tables(summary, protected_tail=args.protected_tail)
    (out / "quality.md").write_text(tables + "\n")
    try:
        plot(summary, out / "quality.png")
        drawn = f", plot {out / 'quality.png'}"
    except ImportError:
        drawn = " (no plot: matplotlib is not installed)"
    print(tables)
    print(f"\n{len(records)} records; summary {out / 'quality.json'}, tables {out / 'quality.md'}{drawn}")
    return 0


def _server_args(info: dict) -> dict:
    """The server arguments worth keeping with a result (the model, the attention backend, every kv_evict flag)."""
    keep = ("model_path", "attention_backend", "page_size", "chunked_prefill_size", "context_length",
            "mem_fraction_static", "disable_cuda_graph", "disable_overlap_schedule")
    return {k: v for k, v in info.items() if k in keep or k.startswith("kv_evict")}


def _progress(total: int, hidden: bool):
    if hidden:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="req", desc="quality", file=sys.stderr)
