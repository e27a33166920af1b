"""Throughput of plain SGLang vs SGLang + sgl-evict on the multi-turn agent workload (GPU host, one device call).

    PYTHONPATH=/tmp/site python3 -m bench.gpu.throughput --out $OUT

(from the repository root; the sgl-evict wheel in /tmp/site gives servers the plugin's entry point).

For one model shape (random weights, ``--load-format dummy``, config written from the public model card), launches
two servers ONE AFTER THE OTHER, never side by side, so that neither's timings include the other's load:

| config | server |
| --- | --- |
| ``plain`` | SGLang without the plugin (``SGLANG_PLUGINS`` names another plugin) |
| ``evict`` | SGLang + ``--kv-evict-policy snapkv --kv-evict-budget 0.1`` |

Both get the same ``--mem-fraction-static``, ``--max-total-tokens`` (a KV pool small enough that KV memory, not
compute, limits how many requests run at once), ``--max-running-requests`` and attention backend. The plugin turns
off overlap scheduling and prefill CUDA graphs when it evicts (patches/server_args.py); ``--plain-extra`` can give
plain SGLang the same settings to separate the two effects. Each server gets two warm-up requests (kernel JIT),
then the same seeded workload for ``--duration`` seconds (bench/serve_bench.py). The whole run keeps within
``--deadline`` seconds: when the first server started slowly, both durations shrink equally (recorded).

Writes ``throughput.json`` (command, device, versions, date, settings, per config: server command, start time,
aggregates, 1 s time series of running requests and KV tokens in use, per-request records, evictions the server
logged), the server logs, and ``throughput.png`` when matplotlib is importable (else: bench/plot_throughput.py).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench import serve_bench
from bench.gpu.smoke import LLAMA_31_8B, _version
from bench.workloads import DEFAULT_VOCAB, agent_sessions, long_context_requests

# Llama-3.2-1B, from its public model card / config.json
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "hidden_act": "silu", "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": 128001,
}
MODELS = {"llama-3.2-1b": LLAMA_32_1B, "llama-3.1-8b": LLAMA_31_8B}
EVICTION_LINE = re.compile(r"sgl-evict: request \S+ kept (\d+) of (\d+) tokens, freed (\d+) slots")
STOP_MARGIN_S = 25  # stopping a server and waiting for its GPU memory to be released
# The first server pays FlashInfer's JIT on a cold machine (2026-11-23: ready 2.5 min after launch, decode graph
# capture 102 s); the second finds the kernels compiled (warm starts: 75-80 s), so it is assumed no slower than this.
SECOND_START_CAP_S = 120


class ServerProcess:
    """``python -m sglang.launch_server`` on 127.0.0.1 in its own process group (stop() ends its workers too)."""

    def __init__(self, name: str, port: int, args: list[str], env: dict[str, str], out: Path):
        self.name, self.port = name, port
        self.log_path = out / f"server-{name}.log"
        cmd = [sys.executable, "-m", "sglang.launch_server", "--host", "127.0.0.1", "--port", str(port), *args]
        self.cmd = " ".join(cmd)
        self.env = env
        self.start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **env}, start_new_session=True)

    def wait_healthy(self, timeout_s: float) -> float | None:
        """Seconds from launch to a 200 on /health, or None (exited or timed out)."""
        while time.monotonic() - self.start < timeout_s and self.proc.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return time.monotonic() - self.start
            except Exception:
                time.sleep(1)
        return None

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


def write_model_config(name: str) -> Path:
    """A config-only checkpoint folder for ``--load-format dummy``."""
    path = Path(f"/tmp/{name}-dummy")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(MODELS[name], indent=1))
    return path


def gpu_query(field: str) -> str | None:
    """One ``nvidia-smi --query-gpu`` field of GPU 0 (no CUDA context in this process)."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0]
    except Exception:
        return None


def wait_gpu_released(timeout_s: float = 30, below_mib: float = 2048) -> None:
    """Waits until GPU 0 holds less than ``below_mib`` (the stopped server's memory is back)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        used = gpu_query("memory.used")
        if used is None or float(used) < below_mib:
            return
        time.sleep(1)


def evictions_logged(log: Path) -> dict:
    """Totals of the plugin's ``kept K of N tokens, freed F slots`` lines (one per evicted prefill)."""
    lines = [tuple(map(int, m)) for m in EVICTION_LINE.findall(log.read_text(errors="replace"))]
    kept, total = sum(k for k, _, _ in lines), sum(n for _, n, _ in lines)
    return {"evicted_prefills": len(lines), "kept_tokens": kept, "logical_tokens": total,
            "freed_slots": sum(f for _, _, f in lines), "kept_fraction": kept / total if total else None}


def check_setup() -> None:
    """Fails fast (before any server starts) when the plugin's entry point is not installed."""
    names = [ep.name for ep in importlib.metadata.entry_points(group="sglang.srt.plugins")]
    if "sgl_evict" not in names:
        raise SystemExit("throughput: the sgl_evict plugin entry point is not installed (pip install --target "
                         "/tmp/site the sgl-evict wheel, then PYTHONPATH=/tmp/site)")


def warm_up(port: int, vocab: tuple[int, int], lengths: tuple[int, ...] = (1024, 9000)) -> float:
    """Requests of ``lengths`` prompt tokens (default 1K and 9K: one and two prefill chunks) so that kernel JIT is
    not timed; a server with a shorter context takes shorter ones."""
    start = time.monotonic()
    streams = serve_bench.OpenStreams()
    for i, n in enumerate(lengths):
        prompt = [vocab[0] + (7 * j + i) % (vocab[1] - vocab[0]) for j in range(n)]
        record = serve_bench.RequestRecord(-1, i, 0.0, n, 16)
        serve_bench.stream_generate(port, record, prompt, float("inf"), streams, timeout_s=300)
        if record.error:
            raise RuntimeError(f"warm-up request failed: {record.error}")
    return time.monotonic() - start


def make_workload(args):
    """The seeded sessions (lazy): each server gets a fresh iterator over exactly the same ones."""
    vocab = (args.vocab_lo, args.vocab_hi)
    if args.workload == "agent":
        return agent_sessions(args.sessions, args.turns, args.seed, vocab=vocab)
    return long_context_requests(args.sessions, args.seed, vocab=vocab)


def shared_duration(requested_s: float, deadline_s: float, spent_s: float, first_start_s: float,
                    servers: int = 2) -> float:
    """Workload seconds for each of ``servers`` (1 or 2) servers, decided when the first is ready (``spent_s`` into
    the script): ``requested_s`` if both runs, both stops and the second server's start (as slow as the first's
    ``first_start_s``, launch to warm, but at most ``SECOND_START_CAP_S``) fit the deadline; else the equal share
    that fits, 10 s at least. A second server that starts later than that gets what is left (recorded). One server
    (``--only``) gets everything up to the deadline but its stop."""
    if servers == 1:
        return min(requested_s, max(10.0, deadline_s - spent_s - STOP_MARGIN_S))
    second_start = min(first_start_s, SECOND_START_CAP_S)
    fits = (deadline_s - spent_s - second_start - 2 * STOP_MARGIN_S) / 2
    return min(requested_s, max(10.0, fits))


def run_config(name: str, port: int, server_args: list[str], env: dict, args, out: Path, t_start: float,
               plan: dict) -> dict:
    """Launch, warm up, benchmark for ``plan["duration_s"]`` (shrunk to fit ``args.deadline``), stop."""
    server = ServerProcess(name, port, server_args, env, out)
    result = {"server_command": server.cmd, "env": env}
    try:
        # never wait past the deadline: a late second server is reported as not healthy, the JSON still written
        healthy = server.wait_healthy(min(args.start_timeout, args.deadline - (time.monotonic() - t_start) - 15))
        result["healthy_after_s"] = healthy
        if healthy is None:
            result["error"] = "not healthy"
            result["log_tail"] = server.log_path.read_text(errors="replace")[-4000:]
            return result
        result["warmup_s"] = warm_up(port, (args.vocab_lo, args.vocab_hi))
        if "first_start_s" not in plan:  # the first server sets the pace: both get the same duration if it fits
            plan["first_start_s"] = time.monotonic() - server.start
            plan["duration_s"] = shared_duration(args.duration, args.deadline, time.monotonic() - t_start,
                                                 plan["first_start_s"], servers=1 if args.only else 2)
        left = args.deadline - (time.monotonic() - t_start) - STOP_MARGIN_S
        duration = min(plan["duration_s"], max(5.0, left))
        result["duration_planned_s"] = duration
        bench = asyncio.run(serve_bench.run_benchmark(port, make_workload(args), args.concurrency, duration,
                                                      args.max_requests, progress=not args.no_progress,
                                                      stream_interval=args.stream_interval))
        result.update(bench)
    except Exception as err:  # the JSON must say what failed, and the other config still runs
        result["error"] = repr(err)
    finally:
        stop_and_record(server, result, keep_tail=bool(result.get("summary", {}).get("errors")))
    return result


def stop_and_record(server: ServerProcess, result: dict, keep_tail: bool = False) -> str:
    """Stops ``server`` and waits for its GPU memory; records in ``result`` whether it was alive, the evictions it
    logged and its tracebacks, and the log's tail when something went wrong (or ``keep_tail``); returns the log."""
    result["alive_at_end"] = server.proc.poll() is None
    server.stop()
    wait_gpu_released()
    result["evictions"] = evictions_logged(server.log_path)
    log = server.log_path.read_text(errors="replace")
    result["log_tracebacks"] = log.count("Traceback")
    if keep_tail or result["log_tracebacks"] or not result["alive_at_end"]:
        result.setdefault("log_tail", log[-4000:])
    return log


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-3.2-1b")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    parser.add_argument("--workload", choices=("agent", "long"), default="agent")
    parser.add_argument("--duration", type=float, default=110, help="seconds of workload per server")
    parser.add_argument("--deadline", type=float, default=450, help="seconds for the whole script")
    # a cold machine compiles FlashInfer while plain SGLang captures its prefill CUDA graphs: 240 s was not enough
    parser.add_argument("--start-timeout", type=float, default=360, help="seconds to wait for /health")
    parser.add_argument("--concurrency", type=int, default=48, help="sessions in flight")
    parser.add_argument("--sessions", type=int, default=2000, help="sessions available (started while time lasts)")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--stream-interval", type=int, default=1, help="tokens per streamed event (SGLang: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-lo", type=int, default=DEFAULT_VOCAB[0])
    parser.add_argument("--vocab-hi", type=int, default=DEFAULT_VOCAB[1])
    parser.add_argument("--max-total-tokens", type=int, default=120_000, help="KV pool size, tokens (both servers)")
    parser.add_argument("--mem-fraction-static", type=float, default=0.8)
    parser.add_argument("--max-running-requests", type=int, default=64)
    parser.add_argument("--attention-backend", default="flashinfer")
    parser.add_argument("--policy", default="snapkv")
    parser.add_argument("--budget", default="0.1")
    parser.add_argument("--plain-extra", default="", help="extra server flags for plain SGLang only")
    parser.add_argument("--server-extra", default="", help="extra server flags for both (e.g. --enable-metrics)")
    parser.add_argument("--only", choices=("plain", "evict"),
                        help="run one config, with the whole deadline (a long run in two device calls; "
                             "python -m bench.plot_throughput A.json B.json --merged-json C.json joins them)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    check_setup()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    model = write_model_config(args.model)
    common = ["--model-path", str(model), "--load-format", "dummy", "--skip-tokenizer-init",
              "--attention-backend", args.attention_backend, "--mem-fraction-static", str(args.mem_fraction_static),
              "--max-total-tokens", str(args.max_total_tokens), "--max-running-requests",
              str(args.max_running_requests), "--cuda-graph-max-bs-decode", str(args.max_running_requests),
              *args.server_extra.split()]
    configs = {
        "plain": ([*common, *args.plain_extra.split()], {"SGLANG_PLUGINS": "not-sgl-evict"}),
        "evict": ([*common, "--kv-evict-policy", args.policy, "--kv-evict-budget", args.budget], {}),
    }
    doc = {"command": " ".join([sys.executable, *sys.argv]), "cwd": os.getcwd(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": gpu_query("name"), "driver": gpu_query("driver_version"),
           "versions": {m: _version(m) for m in ("sglang", "torch", "flashinfer", "triton", "transformers")},
           "model": args.model, "model_config": MODELS[args.model], "settings": vars(args), "configs": {}}
    plan: dict = {}
    for i, (name, (server_args, env)) in enumerate(configs.items()):
        if args.only and name != args.only:
            continue
        print(f"[throughput] {name}: launching", file=sys.stderr, flush=True)
        doc["configs"][name] = run_config(name, 31300 + i, server_args, env, args, out, t_start, plan)
        summary = doc["configs"][name].get("summary")
        print(f"[throughput] {name}: {json.dumps(summary) if summary else doc['configs'][name].get('error')}",
              file=sys.stderr, flush=True)
    doc["plan"] = plan
    doc["wall_s"] = time.monotonic() - t_start
    (out / "throughput.json").write_text(json.dumps(doc, indent=1))
    try:
        from bench.plot_throughput import markdown_table, plot

        plot(doc, out / "throughput.png")
        print(markdown_table(doc))
    except ImportError as err:
        print(f"[throughput] no plot here ({err}): python -m bench.plot_throughput {out / 'throughput.json'}")
    ok = all("summary" in c and c["summary"]["requests_completed"] > 0 for c in doc["configs"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
