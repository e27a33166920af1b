"""The soak (bench/soak.py) against evicting servers on the GPU host, one server at a time (issue 24).

    PYTHONPATH=/tmp/site python3 -m bench.gpu.soak --configs page1,page16 --duration 120 --rate 2 \\
        --deadline 550 --commit SHA --out $OUT

(from the repository root; the sgl-evict wheel in /tmp/site gives servers the plugin's entry point). Servers run
Llama-3.2-1B shapes with random weights (``--load-format dummy``), FlashInfer unless the config says otherwise,
``--kv-evict-policy snapkv --kv-evict-budget 0.1``, a capped pool (``--max-total-tokens``) meant to make the
scheduler retract requests, and chunked prefill of ``--chunked-prefill-size`` tokens. The defaults come from the
first H100 run (2026-12-06): at 0.6 sessions/s at most 5 requests ran and at most 10% of a 150,000-token pool was in
use (15K tokens), so nothing was retracted; 2 sessions/s (about 7.5 requests/s, the issue's 10,000 requests in 22
minutes) against a 40,000-token pool (above the 32K context) should run out of pool. Not yet run at these settings.

| config | server |
| --- | --- |
| ``page1`` | uniform keep-sets, page size 1 |
| ``page16`` | uniform keep-sets, ``--page-size 16`` (whole pages evicted) |
| ``per_layer`` | ``--kv-evict-granularity per_layer`` (Triton, no CUDA graphs, page size 1) |

Per config the soak's JSON, then the server log's checks: no traceback, no line where SGLang's idle check reports a
leak, the server alive at the end. Writes ``soak.json`` (command, commit, device, versions, per config: server
command, soak result, log checks) and the server logs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
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
    write_model_config,
)
from bench.soak import parse_override, run_soak
from bench.workloads import DEFAULT_VOCAB, AgentMix

CONFIGS = {
    "page1": ["--attention-backend", "flashinfer"],
    "page16": ["--attention-backend", "flashinfer", "--page-size", "16"],
    "per_layer": ["--attention-backend", "triton", "--kv-evict-granularity", "per_layer", "--disable-cuda-graph",
                  "--page-size", "1"],
}
#: in SGLang's idle memory check's report when slots are neither free nor cached (a leak)
LEAK_WORD = "leak"


def log_checks(log: Path) -> dict:
    """What the server log says: tracebacks and leak reports (counted), and whether the plugin evicted at all."""
    text = log.read_text(errors="replace")
    lower = text.lower()
    return {"tracebacks": text.count("Traceback"), "leak_lines": lower.count(LEAK_WORD),
            "evictions_logged": text.count("sgl-evict: request "), "aborted_requests": lower.count("abort")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="page1,page16", help=f"comma-separated, from: {', '.join(CONFIGS)}")
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-3.2-1b")
    parser.add_argument("--duration", type=float, default=240, help="seconds of soak per config")
    parser.add_argument("--rate", type=float, default=2.0, help="session arrivals per second")
    parser.add_argument("--overrides", default="server,none,snapkv@0.2,laq@0.1,dapq@0.1")
    parser.add_argument("--abort-fraction", type=float, default=0.15)
    parser.add_argument("--max-total-tokens", type=int, default=40_000, help="KV pool, small enough to retract")
    parser.add_argument("--chunked-prefill-size", type=int, default=4096)
    parser.add_argument("--context-len", type=int, default=32768)
    parser.add_argument("--start-timeout", type=float, default=300)
    parser.add_argument("--deadline", type=float, default=560, help="seconds for the whole script")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commit", default="")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/soak"))
    args = parser.parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        raise SystemExit(f"soak: --configs: unknown {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(CONFIGS)}")
    try:
        overrides = [o for o in args.overrides.split(",") if o]
        for o in overrides:
            parse_override(o)
    except ValueError as err:
        raise SystemExit(f"soak: {err}") from None
    check_setup()
    t_start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = write_model_config(args.model)
    # the longest session (4K system prompt, 10 turns of 2K) stays below the 32K context
    mix = AgentMix(system_tokens=(512, 4096), group_size=4, turns=(2, 10), tool_tokens=(256, 2048),
                   reply_median=48, reply_tokens=(4, 512), think_mean_s=2.0)
    doc = {"command": " ".join([sys.executable, "-m", "bench.gpu.soak", *(sys.argv[1:] if argv is None else argv)]),
           "commit": args.commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": gpu_query("name"), "versions": {m: _version(m) for m in ("sglang", "torch", "sgl-evict")},
           "settings": vars(args), "configs": {}}
    for i, name in enumerate(names):
        left = args.deadline - (time.monotonic() - t_start)
        need = args.duration + 120 + STOP_MARGIN_S  # 120 s: a server's start, 62-150 s seen on the H100
        if left < need:
            doc["configs"][name] = {"error": f"skipped: {left:.0f} s left, the soak needs {need:.0f} s "
                                             f"({args.duration:.0f} s of soak, 120 s to start the server, "
                                             f"{STOP_MARGIN_S} s to stop it)"}
            print(f"[soak] {name}: {doc['configs'][name]['error']}", file=sys.stderr, flush=True)
            continue
        server_args = ["--model-path", str(model), "--load-format", "dummy", "--skip-tokenizer-init",
                       "--context-length", str(args.context_len), "--max-total-tokens", str(args.max_total_tokens),
                       "--chunked-prefill-size", str(args.chunked_prefill_size), "--mem-fraction-static", "0.8",
                       "--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", *CONFIGS[name]]
        server = ServerProcess(name, 31600 + i, server_args, {}, out)
        result: dict = {"server_command": server.cmd}
        try:
            ready = server.wait_healthy(min(args.start_timeout, left - args.duration - STOP_MARGIN_S))
            result["healthy_after_s"] = ready
            if ready is None:
                result["error"] = "not healthy in time"
            else:
                result["soak"] = asyncio.run(run_soak(
                    server.port, args.duration, args.rate, args.seed, mix, overrides, args.abort_fraction,
                    flush_every_s=45, bad_every_s=20, context_len=args.context_len, vocab=DEFAULT_VOCAB,
                    progress=lambda text: print(f"[soak] {name}: {text}", file=sys.stderr, flush=True)))
        except Exception as err:  # noqa: BLE001 - the JSON must say what failed
            result["error"] = repr(err)
        finally:
            stop_and_record(server, result)
            result["log"] = log_checks(server.log_path)
        summary = result.get("soak", {}).get("summary", {})
        result["ok"] = bool(summary.get("ok")) and result["alive_at_end"] and result["log"]["tracebacks"] == 0 \
            and result["log"]["leak_lines"] == 0
        doc["configs"][name] = result
        print(f"[soak] {name}: ok={result['ok']} {json.dumps(summary)}", file=sys.stderr, flush=True)
        (out / "soak.json").write_text(json.dumps(doc, indent=1))
    doc["wall_s"] = time.monotonic() - t_start
    (out / "soak.json").write_text(json.dumps(doc, indent=1))
    return 0 if all(c.get("ok") for c in doc["configs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
