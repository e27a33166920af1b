"""Scoring overhead: prefill time of long prompts with and without eviction (issue 6), one device call.

    PYTHONPATH=/tmp/site python3 -m bench.gpu.prefill_overhead --out $OUT
        [--model llama-3.1-8b] [--lengths 4096,8192,16384,32768,65536] [--policies none,snapkv,dapq,laprox,laq]
        [--new-tokens 2,10] [--repeats 3] [--no-plain]
        [--server-extra=--disable-cuda-graph] [--evict-extra="--kv-evict-granularity per_layer"]

From the repository root; the sgl-evict wheel in /tmp/site gives servers the plugin's entry point. One evicting
server (random weights with a public model shape, ``--kv-evict-policy snapkv``, FlashInfer) answers single requests, one at a time, whose policy is
picked per request (``custom_params["kv_evict"]``): ``none`` on the same server is the baseline, so the difference
is the capture, scoring, selection and freeing alone. Then (unless ``--no-plain``) plain SGLang (the plugin not
loaded: overlap scheduling and prefill CUDA graphs on) answers the same prompts, for the plugin's whole cost.

Every request has its own random prompt (no prefix-cache hit) and asks for ``N`` tokens for each ``N`` of
``--new-tokens``: with 2, the latency is the prefill, the eviction after it and one decode step (the first token
may be streamed before the eviction runs, so TTFT alone can miss it); with ``lookahead + 2`` (10 at the default 8
steps), laq's lookahead steps and its second scoring are inside the latency too. Runs are interleaved (every
policy at one length and repeat before the next), medians over ``--repeats``. Before them every (length, new tokens,
policy) is sent ``--warmup`` times (default once): a fresh server compiles Triton kernels on the first requests
of each shape (seen: 1-3.6 s per request at 4K on 2026-11-24), and those latencies are kept apart (``cold`` in
the summary), not mixed into the medians.

Per-layer budgets (issue 9) cost the same way: ``--attention-backend triton --no-plain`` (decode CUDA graphs; add
``--server-extra=--disable-cuda-graph`` for eager) once as is (uniform) and once with ``--evict-extra="--kv-evict-granularity
per_layer"`` (flags after ``=``: argparse takes a separate value starting with ``--`` for an option; one shell word
each, so quote the value's spaces); the difference between two ``--new-tokens`` values over their difference is the
decode step time.

Writes ``prefill_overhead.json`` (command, device, versions, date, settings, servers, every request) and prints
the median latency per policy and length and its overhead over ``none``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import serve_bench
from bench.gpu.smoke import _version
from bench.gpu.throughput import (
    MODELS,
    STOP_MARGIN_S,
    ServerProcess,
    check_setup,
    gpu_query,
    wait_gpu_released,
    warm_up,
    write_model_config,
)
from bench.plot_prefill_overhead import markdown_table
from bench.workloads import DEFAULT_VOCAB

PORT = 31500
PLAIN = "plain"  # the config name of plain SGLang's requests (it has no per-request policy)


@dataclass(frozen=True)
class Run:
    """One request: ``policy`` (or ``PLAIN``) at a prompt of ``length`` tokens asking ``new_tokens`` tokens."""

    length: int
    new_tokens: int
    policy: str
    repeat: int

    @property
    def key(self) -> str:
        return f"{self.policy}/{self.length}/{self.new_tokens}/{self.repeat}"


def plan_runs(lengths, new_tokens, policies, repeats: int, warmup: int = 0) -> list[Run]:
    """Interleaved: each policy once at a (length, new tokens, repeat) before the next, so drift hits all alike;
    ``warmup`` rounds of the same first (repeats -1, -2, ...: cold requests, not in the medians)."""
    cold = [Run(n, t, p, -1 - r) for r in range(warmup) for n in lengths for t in new_tokens for p in policies]
    return cold + [Run(n, t, p, r) for n in lengths for t in new_tokens for r in range(repeats) for p in policies]


def prompt_ids(run: Run, seed: int, vocab: tuple[int, int]) -> list[int]:
    """A random prompt of ``run.length`` tokens, different for every run and server (no prefix-cache hits)."""
    rng = random.Random(f"{seed}/{run.key}")
    return [rng.randrange(*vocab) for _ in range(run.length)]


def send(port: int, run: Run, prompt: list[int]) -> serve_bench.RequestRecord:
    """One streamed request; the evicting server gets ``run.policy`` as its ``kv_evict`` override."""
    record = serve_bench.RequestRecord(0, 0, 0.0, len(prompt), run.new_tokens)
    custom = None if run.policy == PLAIN else {"kv_evict": {"policy": run.policy}}
    return serve_bench.stream_generate(port, record, prompt, float("inf"), serve_bench.OpenStreams(),
                                       timeout_s=300, custom_params=custom)


def summarize(records: dict[str, dict], runs: list[Run]) -> dict:
    """``"{policy}/{length}/{new_tokens}"`` -> median TTFT and latency (s) over the repeats, and the latency's
    overhead over ``none`` at the same length and new tokens (a fraction), where ``none`` ran; ``"cold"`` ->
    the warm-up requests' latencies (same keys, a list each)."""
    groups: dict[str, list[dict]] = {}
    cold: dict[str, list[float]] = {}
    for run in runs:
        rec = records.get(run.key)
        if run.repeat < 0:
            if rec is not None and rec["latency_s"] is not None:
                cold.setdefault(f"{run.policy}/{run.length}/{run.new_tokens}", []).append(rec["latency_s"])
            continue
        if rec is not None and rec["error"] is None and rec["latency_s"] is not None:
            groups.setdefault(f"{run.policy}/{run.length}/{run.new_tokens}", []).append(rec)
    out = {name: {"n": len(recs), "ttft_s": statistics.median(r["ttft_s"] for r in recs),
                  "latency_s": statistics.median(r["latency_s"] for r in recs)} for name, recs in groups.items()}
    for name, row in out.items():
        base = out.get("none/" + name.split("/", 1)[1])
        row["overhead_vs_none"] = None if base is None else row["latency_s"] / base["latency_s"] - 1
    if cold:
        out["cold"] = cold
    return out


def serve(name: str, args_list: list[str], env: dict, runs: list[Run], args, out: Path, progress=print,
          stop_at: float = float("inf")) -> dict:
    """Launches one server, warms it up, sends ``runs`` one at a time until ``stop_at`` (``time.monotonic()``),
    stops it; its record in the JSON."""
    server = ServerProcess(name, PORT, args_list, env, out)
    entry = {"server_command": server.cmd, "env": env, "records": {}}
    try:
        entry["healthy_after_s"] = server.wait_healthy(args.start_timeout)
        if entry["healthy_after_s"] is None:
            entry["error"] = "not healthy"
            return entry
        entry["warmup_s"] = warm_up(PORT, DEFAULT_VOCAB)
        for i, run in enumerate(runs):
            if time.monotonic() > stop_at:
                entry["stopped_at_deadline_after"] = i
                progress(f"[prefill_overhead] {name}: deadline reached after {i}/{len(runs)} requests")
                break
            rec = send(PORT, run, prompt_ids(run, args.seed, DEFAULT_VOCAB))
            # answers kept (a few hundred tokens per run) so that two runs, e.g. eager and with CUDA graphs, can be
            # compared token for token
            entry["records"][run.key] = {**rec.to_json(), "output_ids": rec.output_ids}
            if rec.error:
                progress(f"[prefill_overhead] {name} {run.key}: {rec.error}")
            if i % 10 == 0 or i == len(runs) - 1:
                progress(f"[prefill_overhead] {name} {i + 1}/{len(runs)} {run.key} {rec.latency_s}")
        entry["alive_at_end"] = server.proc.poll() is None
    finally:
        server.stop()
        wait_gpu_released(STOP_MARGIN_S)
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-3.1-8b")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    parser.add_argument("--lengths", default="4096,8192,16384,32768,65536")
    parser.add_argument("--policies", default="none,snapkv,dapq,laprox,laq")
    parser.add_argument("--new-tokens", default="2,10", help="comma-separated; 10 = laq's 8 lookahead steps + 2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="cold rounds before the measured ones (not in medians)")
    parser.add_argument("--budget", default="0.1")
    parser.add_argument("--attention-backend", default="flashinfer")
    parser.add_argument("--mem-fraction-static", type=float, default=0.8)
    parser.add_argument("--start-timeout", type=float, default=360)
    parser.add_argument("--server-extra", default="", help="extra flags for both servers (e.g. --server-extra=--disable-cuda-graph)")
    parser.add_argument("--evict-extra", default="",
                        help="extra flags for the evicting server (e.g. --evict-extra='--kv-evict-granularity per_layer')")
    parser.add_argument("--no-plain", action="store_true", help="skip plain SGLang")
    parser.add_argument("--no-evict", action="store_true", help="skip the evicting server (plain SGLang only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=float("inf"),
                        help="seconds for the whole script: no request starts after it (the JSON says how far it got)")
    args = parser.parse_args()
    try:
        lengths = [int(n) for n in args.lengths.split(",")]
        new_tokens = [int(n) for n in args.new_tokens.split(",")]
    except ValueError:
        raise SystemExit("prefill_overhead: --lengths and --new-tokens take comma-separated integers")
    policies = args.policies.split(",")
    if "none" not in policies:
        raise SystemExit("prefill_overhead: --policies must include none (the baseline)")
    if args.no_plain and args.no_evict:
        raise SystemExit("prefill_overhead: --no-plain and --no-evict leave nothing to run")
    if args.repeats < 1 or args.warmup < 0 or min(lengths) < 1 or min(new_tokens) < 1:
        raise SystemExit("prefill_overhead: --repeats, --lengths and --new-tokens must be positive, --warmup >= 0")
    check_setup()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = write_model_config(args.model)
    common = ["--model-path", str(model), "--load-format", "dummy", "--skip-tokenizer-init",
              "--context-length", str(max(lengths) + max(new_tokens) + 64),
              "--mem-fraction-static", str(args.mem_fraction_static), "--attention-backend", args.attention_backend,
              "--max-running-requests", "4", *args.server_extra.split()]
    evict_runs = plan_runs(lengths, new_tokens, policies, args.repeats, args.warmup)
    plain_runs = [] if args.no_plain else plan_runs(lengths, new_tokens, [PLAIN], args.repeats, args.warmup)
    report = {"command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "device": gpu_query("name"), "driver": gpu_query("driver_version"),
        "versions": {m: _version(m) for m in ("sglang", "torch", "flashinfer", "triton", "sgl_evict")},
        "model": args.model, "settings": vars(args), "configs": {}}
    started = time.monotonic()
    stop_at = started + args.deadline
    servers = [] if args.no_evict else [
        ("evict", common + ["--kv-evict-policy", "snapkv", "--kv-evict-budget", args.budget, *args.evict_extra.split()],
         {}, evict_runs)]
    if plain_runs:
        servers.append((PLAIN, common, {"SGLANG_PLUGINS": "not-sgl-evict"}, plain_runs))
    for name, server_args, env, runs in servers:  # at least one: --no-plain with --no-evict is refused
        if time.monotonic() > stop_at:
            report["configs"][name] = {"error": "not started: deadline reached", "records": {}}
        else:
            report["configs"][name] = serve(name, server_args, env, runs, args, out, stop_at=stop_at)
        # written after each server: a call cut by the device's time limit keeps what finished
        report["wall_s"] = time.monotonic() - started
        records = {k: v for c in report["configs"].values() for k, v in c["records"].items()}
        report["summary"] = summarize(records, evict_runs + plain_runs)
        (out / "prefill_overhead.json").write_text(json.dumps(report, indent=1))
    for t in new_tokens:
        print(markdown_table(report["summary"], policies + ([PLAIN] if plain_runs else []), lengths, t) + "\n")
    failed = [name for name, c in report["configs"].items() if "error" in c]
    errors = sum(r["error"] is not None for r in records.values())
    if failed or errors:
        print(f"[prefill_overhead] failed servers: {failed}; request errors: {errors}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
