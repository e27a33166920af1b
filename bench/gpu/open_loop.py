"""The open-loop agent sweep (bench/open_loop.py) against servers a user would otherwise run (GPU host, issue 21).

    PYTHONPATH=/tmp/site python3 -m bench.gpu.open_loop --configs plain,evict-laq-0.1 --model llama-3.2-1b \\
        --rates 0.05,0.1,0.2,0.4 --runs 1 --warmup 20 --window 60 --drain 20 --deadline 560 --commit SHA --out $OUT

(from the repository root; the sgl-evict wheel in /tmp/site gives servers the plugin's entry point). Each config is
one server, started once, warmed up, swept over every rate, then stopped before the next one starts (never side by
side). Model shapes come from the public configs (random weights, ``--load-format dummy``):

| config | server |
| --- | --- |
| ``plain`` | SGLang without the plugin, its KV pool as large as ``--mem-fraction-static`` allows |
| ``plain-capped`` | ``plain`` with ``--max-total-tokens CAP`` (the starved-pool regime of earlier runs, labelled) |
| ``plain-fp8`` | ``plain`` with ``--kv-cache-dtype fp8_e4m3`` (half the bytes per token) |
| ``plain-hicache`` | ``plain`` with ``--enable-hierarchical-cache`` (SGLang's host-memory tier for radix nodes) |
| ``plain-evict-sched`` | ``plain`` with overlap scheduling off (eviction's scheduler before 2026-12-07, and where overlap is not verified) |
| ``evict-POLICY-BUDGET`` | SGLang + ``--kv-evict-policy POLICY --kv-evict-budget BUDGET``, e.g. ``evict-laq-0.1`` |
| ``evict-POLICY-BUDGET-restore`` | the same with ``--kv-evict-history restore --kv-evict-host-pool-gb GB`` (issue 25) |

Every config gets the same ``--mem-fraction-static``, ``--max-running-requests``, attention backend and
``--server-extra``. The whole script keeps within ``--deadline`` seconds: a config whose sweep would not fit is
skipped and recorded as such (rates are never dropped from a sweep, so points stay comparable).

Writes ``open_loop.json`` (command, commit, device, versions, date, model, settings; per config: server command,
healthy time, the sweep: per-run points with every request and 1 s load samples, per-rate mean and spread, the
headline) and the server logs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import sys
import time
from pathlib import Path

from bench.gpu.smoke import _version
from bench.gpu.throughput import (
    MODELS,
    STOP_MARGIN_S,
    ServerProcess,
    check_setup,
    gpu_query,
    stop_and_record,
    warm_up,
    write_model_config,
)
from bench.open_loop import add_workload_args, run_sweep, workload_from_args

PLAIN_ENV = {"SGLANG_PLUGINS": "not-sgl-evict"}  # plain SGLang: the plugin's entry point is not loaded
EVICT_CONFIG = re.compile(r"^evict-([a-z_]+)-([0-9.]+)(-restore)?$")
PLAIN_FLAGS = {"plain": [], "plain-fp8": ["--kv-cache-dtype", "fp8_e4m3"],
               "plain-hicache": ["--enable-hierarchical-cache"], "plain-evict-sched": ["--disable-overlap-schedule"]}


def config_server(name: str, cap: int, host_pool_gb: float = 32) -> tuple[list[str], dict[str, str]]:
    """The flags and environment that make config ``name`` (module table); ValueError for an unknown name."""
    if name in PLAIN_FLAGS:
        return list(PLAIN_FLAGS[name]), dict(PLAIN_ENV)
    if name == "plain-capped":
        return ["--max-total-tokens", str(cap)], dict(PLAIN_ENV)
    m = EVICT_CONFIG.match(name)
    if m:
        flags = ["--kv-evict-policy", m.group(1), "--kv-evict-budget", m.group(2)]
        if m.group(3):
            flags += ["--kv-evict-history", "restore", "--kv-evict-host-pool-gb", f"{host_pool_gb:g}"]
        return flags, {}
    raise ValueError(f"--configs: unknown config {name!r}; choose from {', '.join([*PLAIN_FLAGS, 'plain-capped'])} "
                     "or evict-POLICY-BUDGET[-restore] (e.g. evict-laq-0.1, evict-snapkv-0.1-restore)")


def sweep_seconds(rates: int, runs: int, warmup_s: float, window_s: float, drain_s: float) -> float:
    """Wall time of one sweep: every point's arrivals and drain, and a few seconds to flush between points."""
    return rates * runs * (warmup_s + window_s + drain_s + 5.0)


def run_config(name: str, port: int, server_args: list[str], env: dict, args, workload, out: Path,
               t_start: float) -> dict:
    """Launch, warm up, sweep, stop; every failure is recorded, never raised (the next config still runs)."""
    rates, mix, slo, vocab = workload
    need = sweep_seconds(len(rates), args.runs, args.warmup, args.window, args.drain)
    server = ServerProcess(name, port, server_args, env, out)
    result = {"server_command": server.cmd, "env": env, "sweep_s_planned": need}
    try:
        left = args.deadline - (time.monotonic() - t_start)
        healthy = server.wait_healthy(min(args.start_timeout, left - need - STOP_MARGIN_S))
        result["healthy_after_s"] = healthy
        if healthy is None:
            result["error"] = "not healthy in time for its sweep"
            result["log_tail"] = server.log_path.read_text(errors="replace")[-4000:]
            return result
        result["warmup_s"] = warm_up(port, vocab)
        left = args.deadline - (time.monotonic() - t_start) - STOP_MARGIN_S
        if left < need:
            result["error"] = f"skipped: its sweep needs {need:.0f} s, {left:.0f} s left before the deadline"
            return result
        result["sweep"] = asyncio.run(run_sweep(
            port, rates, args.runs, args.warmup, args.window, args.drain, args.seed, mix, slo, vocab,
            flush=not args.no_flush, max_in_flight=args.max_in_flight,
            progress=lambda text: print(f"[open_loop] {name}: {text}", file=sys.stderr, flush=True)))
    except Exception as err:  # noqa: BLE001 - the JSON must say what failed
        result["error"] = repr(err)
    finally:
        stop_and_record(server, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="plain,evict-laq-0.1", help="comma-separated (module table)")
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-3.2-1b")
    parser.add_argument("--mem-fraction-static", type=float, default=0.85)
    parser.add_argument("--max-running-requests", type=int, default=256)
    parser.add_argument("--capped-tokens", type=int, default=120_000, help="plain-capped's --max-total-tokens")
    parser.add_argument("--attention-backend", default="flashinfer")
    parser.add_argument("--host-pool-gb", type=float, default=32, help="the -restore configs' host KV pool (GiB)")
    parser.add_argument("--server-extra", default="", help="more flags for every server, space-separated")
    parser.add_argument("--start-timeout", type=float, default=360, help="seconds to wait for /health")
    parser.add_argument("--deadline", type=float, default=560, help="seconds for the whole script")
    parser.add_argument("--commit", default="", help="the sgl-evict commit being run (the host has no .git)")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/open-loop"))
    add_workload_args(parser)
    args = parser.parse_args(argv)
    workload = workload_from_args(args)
    names = [c for c in args.configs.split(",") if c]
    try:
        servers = {name: config_server(name, args.capped_tokens, args.host_pool_gb) for name in names}
    except ValueError as err:
        raise SystemExit(f"open_loop: {err}") from None
    check_setup()
    t_start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = write_model_config(args.model)
    common = ["--model-path", str(model), "--load-format", "dummy", "--skip-tokenizer-init",
              "--attention-backend", args.attention_backend, "--mem-fraction-static", str(args.mem_fraction_static),
              "--max-running-requests", str(args.max_running_requests), *args.server_extra.split()]
    doc = {"command": " ".join([sys.executable, "-m", "bench.gpu.open_loop", *(sys.argv[1:] if argv is None
                                                                                 else argv)]),
           "commit": args.commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": gpu_query("name"), "driver": gpu_query("driver_version"),
           "versions": {m: _version(m) for m in ("sglang", "torch", "flashinfer", "triton", "sgl-evict")},
           "model": args.model, "model_config": MODELS[args.model], "settings": vars(args), "configs": {}}
    for i, name in enumerate(names):
        flags, env = servers[name]
        print(f"[open_loop] {name}: launching", file=sys.stderr, flush=True)
        doc["configs"][name] = run_config(name, 31500 + i, [*common, *flags], env, args, workload, out, t_start)
        head = doc["configs"][name].get("sweep", {}).get("headline")
        print(f"[open_loop] {name}: {json.dumps(head) if head else doc['configs'][name].get('error')}",
              file=sys.stderr, flush=True)
        (out / "open_loop.json").write_text(json.dumps(doc, indent=1))  # a later cut keeps what ran
    doc["wall_s"] = time.monotonic() - t_start
    (out / "open_loop.json").write_text(json.dumps(doc, indent=1))
    return 0 if all("sweep" in c for c in doc["configs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
