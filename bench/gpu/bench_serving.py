"""SGLang's own benchmark client against plain and evicting Gemma 3 270M servers (GPU host, issue 21 item 4).

    PYTHONPATH=/tmp/site python3 -m bench.gpu.bench_serving --configs plain --window 20 --trace-rates 0.5,2 \\
        --gsp-rates 8,32 --random-rates 2,6 --deadline 560 --commit SHA --out $OUT

(from the repository root; bundles a, b, c, the Gemma parts and tokenizer, and for evicting configs the sgl-evict
wheel, in /tmp/site: docs/benchmarks.md). For each config of ``--configs`` (the names of bench/gpu/open_loop.py:
``plain``, ``plain-fp8``, ``plain-hicache``, ``plain-evict-sched``, ``plain-capped``, ``evict-POLICY-BUDGET``), one
at a time: start ONE server on the Gemma 3 270M checkpoint (``--model``, converted from the carried GGUF when it is
the default path and absent; Triton attention: SGLang 0.5.17's FlashInfer prefill rejects Gemma 3's sliding-window
batches, docs/gpu.md; with its tokenizer, and ``--chat-template gemma-it``, SGLang's built-in Gemma 3 chat
template, because the converted checkpoint has none and the multi-turn replay needs ``/v1/chat/completions``), warm
it up, then run ``python3 -m sglang.benchmark.serving`` (``sglang.bench_serving`` forwards there in 0.5.17) as a
subprocess, once per dataset and rate, all against that server; stop it; next config.

Datasets (none downloads anything):

- ``agentic-trace``: multi-turn agent conversations replayed round by round, each round's prompt the whole history
  with the server's real replies (``--backend sglang-oai-chat``, the only kind of backend the multi-turn replay
  accepts). The trace is bench/agentic_trace.py's rendering of the open-loop agent mix, written at the start
  (``--trace-*`` flags; conversations cut to ``--trace-max-context`` tokens). ``--request-rate`` is conversations
  started per second.
- ``generated-shared-prefix``: ``--gsp-groups`` system prompts of ``--gsp-system-len`` tokens, each shared by a
  group of single-turn requests (random-token text from the Gemma tokenizer's vocabulary; ``--backend sglang``).
- ``random-ids``: long single-turn prompts of consecutive token ids, ``--random-input-len`` tokens at most and
  ``--random-range-ratio`` of that at least, sent as ids (``--tokenize-prompt``), short answers.

Each run is ``ceil(rate * --window)`` requests (conversations for the trace; rounded up to whole groups for the
shared-prefix set), so a run's arrivals last about ``--window`` seconds; the client then waits for all of them.
Every run flushes the server's prefix cache after the client's own warm-up request (``--flush-cache``), so each
starts cold. ``--deadline`` bounds the whole script: each config gets an equal share of what is left when it
starts, a run that would not fit its share is skipped and recorded, and a client still running at the deadline is
stopped (recorded as cut).

Writes ``bench_serving.json`` (command, commit, device, versions, the trace's metadata and sha256; per config: the
server command and environment, healthy time, and per run the client's command line verbatim, its exit status, its
JSONL record (``--output-file``, without the per-request lists), our summary of that record (goodput under the
TTFT/TPOT SLO of bench/open_loop.py, from the per-request lists of ``--output-details``), the result block it
printed, and the server's prefill totals and the plugin's evictions from its log lines during the run), the
client's JSONL and log per run under ``client/``, and the server logs.

Flags of ``sglang.benchmark.serving`` used here, read from SGLang 0.5.17's ``cli_main`` (sglang/benchmark/serving.py)::

    parser.add_argument("--backend", type=str, choices=list(ASYNC_REQUEST_FUNCS.keys()), default="sglang", ...)
        # ASYNC_REQUEST_FUNCS has "sglang" (/generate) and "sglang-oai-chat" (/v1/chat/completions)
    parser.add_argument("--host", type=str, default="0.0.0.0", ...)
    parser.add_argument("--port", type=int, ...)
    parser.add_argument("--ready-check-timeout-sec", type=int, default=60, ...)
    parser.add_argument("--dataset-name", type=str, default="sharegpt", choices=["agentic-trace", ...,
                        "random-ids", "generated-shared-prefix", ...])
    parser.add_argument("--dataset-path", type=str, default="", ...)
    parser.add_argument("--tokenizer", type=str, ...)
    parser.add_argument("--num-prompts", type=int, default=1000, ...)
    parser.add_argument("--sharegpt-output-len", type=int, default=None, ...)   # agentic-trace: per-turn answer
    parser.add_argument("--random-input-len", type=int, default=1024, ...)
    parser.add_argument("--random-output-len", default=1024, type=int, ...)
    parser.add_argument("--random-range-ratio", type=float, default=0.0, ...)
    parser.add_argument("--request-rate", type=float, default=float("inf"), ...)
    parser.add_argument("--output-file", type=str, help="Output JSONL file name.")
    parser.add_argument("--output-details", action="store_true", ...)
    parser.add_argument("--disable-tqdm", action="store_true", ...)
    parser.add_argument("--cache-report", action="store_true", ...)
    parser.add_argument("--seed", type=int, default=42, ...)
    parser.add_argument("--flush-cache", action="store_true", ...)
    parser.add_argument("--warmup-requests", type=int, default=1, ...)
    parser.add_argument("--tokenize-prompt", action="store_true", ...)   # only with --backend sglang
    group.add_argument("--gsp-num-groups", type=int, default=64, ...)
    group.add_argument("--gsp-prompts-per-group", type=int, default=16, ...)
    group.add_argument("--gsp-system-prompt-len", type=int, default=2048, ...)
    group.add_argument("--gsp-question-len", type=int, default=128, ...)
    group.add_argument("--gsp-output-len", type=int, default=256, ...)
    parser.add_argument("--tag", type=str, default=None, ...)

(``--max-concurrency`` and the rest can be added with ``--client-extra``.) Read from the same sources: the
generated-shared-prefix set asserts ``not tokenize_prompt``; ``--flush-cache`` posts ``/flush_cache`` after the
warm-up; the multi-turn replay's input-token totals are 0 and its ``--cache-report`` hit rate divides by the
first turn's ``prompt_tokens`` for every round (0.5.17's ``calculate_metrics`` gets ``input_requests=None``), so
for the trace this script reports the trace's estimated prompt tokens and the server's own prefill counts instead.
0.5.17's ``sglang/benchmark/datasets/__init__.py`` imports every dataset module, mmmu's ``from datasets import
load_dataset`` included: where HF ``datasets`` is not installed (it is in none of our bundles) the client gets a
stub ``datasets`` module (first on its ``PYTHONPATH``, recorded; also when an installed one fails to
import) whose ``load_dataset`` raises; none of the three
datasets here calls it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench.agentic_trace import add_mix_args, mix_from_args, write_trace
from bench.gpu.open_loop import config_server
from bench.gpu.smoke import SITE, _version
from bench.gpu.throughput import (
    EVICTION_LINE,
    STOP_MARGIN_S,
    ServerProcess,
    check_setup,
    gpu_query,
    stop_and_record,
    warm_up,
)

DEFAULT_MODEL = Path("/tmp/gemma3-270m-hf")
DATASETS = ("agentic-trace", "generated-shared-prefix", "random-ids")
RATE_FLAGS = {"agentic-trace": "trace_rates", "generated-shared-prefix": "gsp_rates", "random-ids": "random_rates"}
PREFILL_LINE = re.compile(r"Prefill batch.*?#new-seq: (\d+), #new-token: (\d+), #cached-token: (\d+)")
RESULT_LINE = re.compile(r"^(.+?):\s+(\S.*?)\s*$")
#: per-request lists of ``--output-details`` kept in the client's JSONL file, left out of bench_serving.json
DETAIL_KEYS = ("input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors", "cached_tokens",
               "cached_tokens_details", "server_info")
DATASETS_STUB = '''"""Stub of HF datasets for sglang.benchmark.serving offline (bench/gpu/bench_serving.py): SGLang
0.5.17's dataset package imports mmmu, which imports load_dataset; the datasets used here never call it."""


def load_dataset(*args, **kwargs):
    raise RuntimeError("HF datasets is not installed here (stub from bench/gpu/bench_serving.py)")
'''


def requests_for(rate: float, window_s: float, minimum: int = 2) -> int:
    """Requests (conversations for the trace) whose Poisson arrivals at ``rate`` last about ``window_s``."""
    return max(minimum, math.ceil(rate * window_s))


def client_command(dataset: str, rate: float, port: int, args, out_file: Path, tag: str,
                   trace_path: Path | None = None) -> list[str]:
    """The ``sglang.benchmark.serving`` command line of one run (module docstring: every flag is 0.5.17's)."""
    n = requests_for(rate, args.window)
    backend = "sglang-oai-chat" if dataset == "agentic-trace" else "sglang"
    cmd = [sys.executable, "-m", "sglang.benchmark.serving", "--backend", backend, "--host", "127.0.0.1",
           "--port", str(port), "--tokenizer", str(args.model), "--dataset-name", dataset,
           "--request-rate", f"{rate:g}", "--seed", str(args.seed), "--output-file", str(out_file),
           "--output-details", "--cache-report", "--flush-cache", "--warmup-requests", "1", "--disable-tqdm",
           "--ready-check-timeout-sec", "30", "--tag", tag]
    if dataset == "agentic-trace":
        if trace_path is None:
            raise ValueError("agentic-trace needs the trace file")
        cmd += ["--dataset-path", str(trace_path), "--num-prompts", str(n),
                "--sharegpt-output-len", str(args.trace_reply_tokens)]
    elif dataset == "generated-shared-prefix":
        per_group = math.ceil(n / args.gsp_groups)
        cmd += ["--gsp-num-groups", str(args.gsp_groups), "--gsp-prompts-per-group", str(per_group),
                "--gsp-system-prompt-len", str(args.gsp_system_len), "--gsp-question-len", str(args.gsp_question_len),
                "--gsp-output-len", str(args.gsp_output_len)]
    elif dataset == "random-ids":
        cmd += ["--num-prompts", str(n), "--random-input-len", str(args.random_input_len),
                "--random-output-len", str(args.random_output_len), "--random-range-ratio",
                f"{args.random_range_ratio:g}", "--tokenize-prompt"]
    else:
        raise ValueError(f"unknown dataset {dataset!r}")
    return cmd + shlex.split(args.client_extra)


def datasets_stub(root: Path, force: bool = False) -> Path | None:
    """A folder holding a stub ``datasets`` package when HF datasets is not installed here or ``force`` (else None)."""
    if not force and importlib.util.find_spec("datasets") is not None:
        return None
    (root / "datasets").mkdir(parents=True, exist_ok=True)
    (root / "datasets" / "__init__.py").write_text(DATASETS_STUB)
    return root


def client_env(stub: Path | None) -> dict[str, str]:
    """The client's environment: offline (no hub look-ups), the datasets stub first on its path when needed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if stub is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(stub), *filter(None, [env.get("PYTHONPATH")])])
    return env


def prepare_client(work: Path) -> tuple[dict, dict]:
    """The client's environment, and what was found: whether ``python -m sglang.benchmark.serving --help`` runs
    (it imports every dataset module), with the datasets stub if HF datasets is missing or does not import."""
    stub = datasets_stub(work / "stub")
    env = client_env(stub)
    cmd = [sys.executable, "-m", "sglang.benchmark.serving", "--help"]
    pre = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if pre.returncode != 0 and stub is None and "datasets" in pre.stderr:
        stub = datasets_stub(work / "stub", force=True)
        env = client_env(stub)
        pre = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    return env, {"rc": pre.returncode, "datasets_stub": str(stub) if stub else None,
                 "tail": (pre.stdout + pre.stderr)[-2000:]}


def parse_printed(stdout: str) -> dict:
    """The client's printed result block (from ``Serving Benchmark Result`` to the closing ``=`` line) as
    ``{label: number or text}``."""
    out: dict = {}
    inside = False
    for line in stdout.splitlines():
        if "Serving Benchmark Result" in line:
            inside = True
            continue
        if not inside:
            continue
        if line.startswith("=" * 20):
            break
        m = RESULT_LINE.match(line.strip())
        if not m or m.group(1).startswith("-"):
            continue
        value = m.group(2)
        try:
            out[m.group(1)] = float(value.rstrip("%"))
        except ValueError:
            out[m.group(1)] = value
    return out


def read_jsonl(path: Path) -> dict | None:
    """The last record of the client's ``--output-file`` (it appends one per run), or None."""
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return None
    return json.loads(lines[-1]) if lines else None


def summarize(record: dict, slo_ttft_s: float, slo_tpot_s: float) -> dict:
    """Our reading of one client record: its headline numbers, and goodput under the SLO (a request meets it when it
    succeeded, its TTFT <= ``slo_ttft_s`` and its time per output token after the first <= ``slo_tpot_s``), per
    second of the client's duration, from the per-request lists of ``--output-details``."""
    errors = record.get("errors") or []
    ttfts, itls, lens = record.get("ttfts") or [], record.get("itls") or [], record.get("output_lens") or []
    met = 0
    for i, err in enumerate(errors):
        if err:
            continue
        n, gaps = (lens[i] if i < len(lens) else 0), (itls[i] if i < len(itls) else [])
        tpot = sum(gaps) / (n - 1) if n > 1 and gaps else 0.0
        met += ttfts[i] <= slo_ttft_s and tpot <= slo_tpot_s
    duration = record.get("duration") or 0.0
    keys = ("completed", "duration", "request_throughput", "input_throughput", "output_throughput",
            "total_throughput", "concurrency", "max_concurrent_requests", "median_ttft_ms", "p90_ttft_ms",
            "p99_ttft_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p90_itl_ms",
            "median_e2e_latency_ms", "p90_e2e_latency_ms")
    return {**{k: record.get(k) for k in keys}, "requests": len(errors),
            "failed": sum(bool(e) for e in errors), "first_error": next((e for e in errors if e), None),
            "slo_met_requests": met, "goodput_requests_per_s": met / duration if duration else None,
            "cached_tokens": sum(record.get("cached_tokens") or []) if record.get("cached_tokens") else None,
            "cache_report": record.get("cache_report")}


def prefill_totals(log_text: str) -> dict:
    """The server's ``Prefill batch`` lines (SGLang 0.5.17 scheduler: ``#new-seq``, ``#new-token``,
    ``#cached-token``) summed; ``hit_rate``: cached / (new + cached) tokens."""
    rows = [tuple(map(int, m)) for m in PREFILL_LINE.findall(log_text)]
    new, cached = sum(r[1] for r in rows), sum(r[2] for r in rows)
    return {"batches": len(rows), "new_seqs": sum(r[0] for r in rows), "new_tokens": new, "cached_tokens": cached,
            "hit_rate": cached / (new + cached) if new + cached else None}


def evictions_in(log_text: str) -> dict:
    """The plugin's ``kept K of N tokens, freed F slots`` lines (one per evicted prefill) in a stretch of log."""
    rows = [tuple(map(int, m)) for m in EVICTION_LINE.findall(log_text)]
    kept, total = sum(r[0] for r in rows), sum(r[1] for r in rows)
    return {"evicted_prefills": len(rows), "kept_tokens": kept, "logical_tokens": total,
            "kept_fraction": kept / total if total else None}


def trace_prompt_tokens(trace: dict, conversations: int) -> int:
    """Estimated prompt tokens of every round of the trace's first ``conversations`` (the replay's input)."""
    return sum(t["prompt_tokens"] for c in trace["conversations"][:conversations] for t in c)


def run_client(cmd: list[str], env: dict, timeout_s: float, log_path: Path) -> dict:
    """Runs one client; its stdout and stderr go to ``log_path``. ``rc`` None when it was stopped at the timeout."""
    start = time.monotonic()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
    return {"rc": rc, "wall_s": round(time.monotonic() - start, 1), "timed_out": rc is None}


def run_plan(args) -> list[tuple[str, float]]:
    """(dataset, rate) pairs in the order they run against each server."""
    plan = []
    for dataset in args.datasets.split(","):
        rates = _rates(getattr(args, RATE_FLAGS[dataset]), "--" + RATE_FLAGS[dataset].replace("_", "-"))
        plan += [(dataset, r) for r in sorted(rates)]
    return plan


def run_config(name: str, port: int, server_args: list[str], env: dict, args, plan, trace: dict | None,
               trace_path: Path | None, client_environ: dict, out: Path, t_start: float, share_end: float) -> dict:
    """Launch, warm up, run every (dataset, rate) that fits before ``share_end``, stop; failures are recorded."""
    server = ServerProcess(name, port, server_args, env, out)
    result: dict = {"server_command": server.cmd, "env": env, "runs": []}
    try:
        left = args.deadline - (time.monotonic() - t_start) - STOP_MARGIN_S
        healthy = server.wait_healthy(min(args.start_timeout, left))
        result["healthy_after_s"] = healthy
        if healthy is None:
            result["error"] = "not healthy in time"
            result["log_tail"] = server.log_path.read_text(errors="replace")[-4000:]
            return result
        result["warmup_s"] = round(warm_up(port, (100, 128000)), 2)
        for dataset, rate in plan:
            tag = f"{name}/{dataset}@{rate:g}"
            run: dict = {"dataset": dataset, "rate": rate}
            result["runs"].append(run)
            now = time.monotonic()
            need = args.window + args.run_overhead
            if now + need + STOP_MARGIN_S > share_end:
                run["skipped"] = (f"needs ~{need:.0f} s, {share_end - now - STOP_MARGIN_S:.0f} s left in this "
                                  "config's share of the deadline")
                continue
            stem = f"{dataset}-r{rate:g}"
            jsonl = out / "client" / name / f"{stem}.jsonl"
            jsonl.parent.mkdir(parents=True, exist_ok=True)
            jsonl.unlink(missing_ok=True)
            cmd = client_command(dataset, rate, port, args, jsonl, tag, trace_path)
            run["command"] = shlex.join(cmd)
            offset = server.log_path.stat().st_size
            hard_left = args.deadline - (now - t_start) - STOP_MARGIN_S
            run.update(run_client(cmd, client_environ, min(args.run_timeout, hard_left), jsonl.with_suffix(".log")))
            printed = jsonl.with_suffix(".log").read_text(errors="replace")
            run["printed"] = parse_printed(printed)
            record = read_jsonl(jsonl)
            if record is None:
                run["error"] = "no result record" + (" (stopped at the deadline)" if run["timed_out"] else "")
                run["log_tail"] = printed[-3000:]
            else:
                result.setdefault("server_info", record.get("server_info"))
                run["record"] = {k: v for k, v in record.items() if k not in DETAIL_KEYS}
                run["summary"] = summarize(record, args.slo_ttft, args.slo_tpot)
            with open(server.log_path, errors="replace") as f:
                f.seek(offset)
                stretch = f.read()
            run["server_prefill"] = prefill_totals(stretch)  # the client's warm-up round included
            run["evictions"] = evictions_in(stretch)
            if dataset == "agentic-trace" and trace is not None:
                n = int(cmd[cmd.index("--num-prompts") + 1])
                est = trace_prompt_tokens(trace, n)
                run["trace_prompt_tokens_estimated"] = est
                if record is not None and record.get("duration"):
                    run["input_throughput_estimated"] = est / record["duration"]
            s = run.get("summary") or {}
            print(f"[bench_serving] {tag}: rc {run['rc']}, {s.get('completed')} done, "
                  f"{s.get('request_throughput')} req/s, goodput {s.get('goodput_requests_per_s')}, "
                  f"TTFT p90 {s.get('p90_ttft_ms')} ms, TPOT p90 {s.get('p90_tpot_ms')} ms", file=sys.stderr,
                  flush=True)
    except Exception as err:  # noqa: BLE001 - the JSON must say what failed, and the next config still runs
        result["error"] = repr(err)
    finally:
        log = stop_and_record(server, result)
        result["pool_lines"] = [ln[-300:] for ln in log.splitlines()
                                if "KV Cache is allocated" in ln or "max_total_num_tokens" in ln][:8]
    return result


def _rates(text: str, flag: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"bench_serving: {flag}: comma-separated numbers, got {text!r}") from None
    if not vals or any(not (v > 0 and math.isfinite(v)) for v in vals):
        raise SystemExit(f"bench_serving: {flag}: give positive finite rates, got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="plain,evict-laq-0.1", help="comma-separated, bench/gpu/open_loop.py's")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="Gemma 3 270M HF checkpoint (tokenizer)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated, run in this order")
    parser.add_argument("--window", type=float, default=20, help="seconds of arrivals per run (requests = rate x it)")
    parser.add_argument("--run-overhead", type=float, default=30,
                        help="seconds a run takes beyond its window (client start, data, warm-up, drain)")
    parser.add_argument("--run-timeout", type=float, default=240, help="a client still running after it is stopped")
    parser.add_argument("--trace-rates", default="0.5,2", help="conversations started per second")
    parser.add_argument("--gsp-rates", default="8,32", help="requests per second")
    parser.add_argument("--random-rates", default="2,6", help="requests per second")
    parser.add_argument("--trace-reply-tokens", type=int, default=128, help="answer tokens per round")
    parser.add_argument("--trace-max-context", type=int, default=30000,
                        help="conversations stop before a round that would not fit (Gemma 3 270M: 32768)")
    add_mix_args(parser, prefix="trace-")
    parser.add_argument("--trace", type=Path, default=Path("/tmp/bench-serving/agentic_trace.json"),
                        help="where the trace is written (not under --out: it is regenerated from the seed); the "
                             "client's datasets stub goes beside it")
    parser.add_argument("--gsp-groups", type=int, default=16)
    parser.add_argument("--gsp-system-len", type=int, default=4096)
    parser.add_argument("--gsp-question-len", type=int, default=256)
    parser.add_argument("--gsp-output-len", type=int, default=128)
    parser.add_argument("--random-input-len", type=int, default=16384)
    parser.add_argument("--random-output-len", type=int, default=64)
    parser.add_argument("--random-range-ratio", type=float, default=0.5)
    parser.add_argument("--client-extra", default="", help="more sglang.benchmark.serving flags")
    parser.add_argument("--slo-ttft", type=float, default=2.0, help="seconds (bench/open_loop.py's default)")
    parser.add_argument("--slo-tpot", type=float, default=0.050, help="seconds per output token")
    parser.add_argument("--seed", type=int, default=0, help="the client's --seed and the trace's")
    parser.add_argument("--mem-fraction-static", type=float, default=0.85)
    parser.add_argument("--max-running-requests", type=int, default=256)
    parser.add_argument("--capped-tokens", type=int, default=120_000, help="plain-capped's --max-total-tokens")
    parser.add_argument("--attention-backend", default="triton")
    parser.add_argument("--chat-template", default="gemma-it",
                        help="the servers' --chat-template (SGLang built-in name; empty: the checkpoint's own)")
    parser.add_argument("--server-extra", default="", help="more flags for every server, space-separated")
    parser.add_argument("--start-timeout", type=float, default=300, help="seconds to wait for /health")
    parser.add_argument("--deadline", type=float, default=560, help="seconds for the whole script")
    parser.add_argument("--commit", default="", help="the sgl-evict commit being run (the host has no .git)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/bench-serving")))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.monotonic()
    names = [c for c in args.configs.split(",") if c]
    try:
        servers = {name: config_server(name, args.capped_tokens) for name in names}
    except ValueError as err:
        raise SystemExit(f"bench_serving: {err}") from None
    bad = [d for d in args.datasets.split(",") if d not in DATASETS]
    if bad or not args.datasets:
        raise SystemExit(f"bench_serving: --datasets: unknown {bad}; choose from {', '.join(DATASETS)}")
    plan = run_plan(args)
    mix = mix_from_args(args, prefix="trace-")
    if any(not env for _, env in servers.values()):  # an evicting server needs the plugin's entry point
        check_setup()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = "python3 -m bench.gpu.bench_serving " + shlex.join(sys.argv[1:] if argv is None else argv)
    doc: dict = {"command": command, "commit": args.commit,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "device": gpu_query("name"), "driver": gpu_query("driver_version"),
                 "versions": {m: _version(m) for m in ("sglang", "torch", "triton", "transformers", "aiohttp")},
                 "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                 "configs": {}}
    if not (args.model / "config.json").exists() and args.model == DEFAULT_MODEL:
        from bench.gpu.smoke import convert_gemma

        t = time.monotonic()
        convert_gemma(SITE / "gemma-parts", args.model)
        doc["gemma_convert_s"] = round(time.monotonic() - t, 1)
    environ, doc["client_preflight"] = prepare_client(args.trace.parent)
    trace = None
    if "agentic-trace" in args.datasets.split(","):
        n = max(requests_for(r, args.window) for d, r in plan if d == "agentic-trace")
        write_trace(args.trace, n, args.seed, mix, args.trace_reply_tokens, args.trace_max_context,
                    command=f"bench.gpu.bench_serving (seed {args.seed}, trace-* flags)")
        trace = json.loads(args.trace.read_text())
        doc["trace"] = {"path": str(args.trace), "sha256": hashlib.sha256(args.trace.read_bytes()).hexdigest(),
                        "metadata": trace["metadata"]}
    if doc["client_preflight"]["rc"] != 0:
        doc["error"] = "sglang.benchmark.serving does not start here (client_preflight): no server started"
        (out / "bench_serving.json").write_text(json.dumps(doc, indent=1))
        print(f"[bench_serving] {doc['error']}\n{doc['client_preflight']['tail']}", file=sys.stderr)
        return 1
    common = ["--model-path", str(args.model), "--attention-backend", args.attention_backend,
              "--mem-fraction-static", str(args.mem_fraction_static),
              "--max-running-requests", str(args.max_running_requests),
              *(["--chat-template", args.chat_template] if args.chat_template else []),
              *shlex.split(args.server_extra)]
    for i, name in enumerate(names):
        flags, env = servers[name]
        left = args.deadline - (time.monotonic() - t_start)
        share_end = time.monotonic() + left / (len(names) - i)
        print(f"[bench_serving] {name}: launching ({left / (len(names) - i):.0f} s share)", file=sys.stderr,
              flush=True)
        doc["configs"][name] = run_config(name, 31600 + i, [*common, *flags], env, args, plan, trace, args.trace,
                                          environ, out, t_start, share_end)
        (out / "bench_serving.json").write_text(json.dumps(doc, indent=1))  # a later cut keeps what ran
    doc["wall_s"] = round(time.monotonic() - t_start, 1)
    (out / "bench_serving.json").write_text(json.dumps(doc, indent=1))
    # 0: every planned run of every config completed requests (skipped and failed runs are in the JSON)
    runs = [run for c in doc["configs"].values() for run in c["runs"]]
    complete = all(len(c["runs"]) == len(plan) for c in doc["configs"].values())
    return 0 if complete and all(run.get("summary", {}).get("completed") for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
