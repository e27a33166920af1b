"""Decode step time with the plugin against plain SGLang, batch 1 and 64 (issue 22 items 2 and 3), one device call.

    PYTHONPATH=/tmp/site python3 -m bench.gpu.decode_overhead --out $OUT
        [--model llama-3.1-8b] [--batches 1,64] [--prompt-len 2048] [--new-tokens 256] [--rounds 3]
        [--configs plain,plain-sched,evict,evict-overlap] [--chunked-prefill-size N] [--deadline S] --commit SHA
    python3 -m bench.gpu.decode_overhead --merge A.json B.json ... --out DIR   (one report from several calls)

(from the repository root; the sgl-evict wheel in /tmp/site gives servers the plugin's entry point). Servers run
one after another with the same flags (random weights of a public model shape, FlashInfer, decode CUDA graphs):

| config | server |
| --- | --- |
| ``plain`` | SGLang without the plugin: its overlap scheduler and prefill CUDA graphs on (its defaults) |
| ``plain-sched`` | plain with overlap and prefill CUDA graphs off (the scheduler of ``evict``) |
| ``evict`` | ``--kv-evict-policy snapkv --kv-evict-budget 0.1 --disable-overlap-schedule`` |
| ``evict-overlap`` | the same with SGLang's overlap scheduler on (the plugin's default since 2026-12-07 where verified; ``SGL_EVICT_EXPERIMENTAL_OVERLAP=1`` keeps it on elsewhere, e.g. ``--attention-backend triton --page-size 16``) |

The evicting servers answer two kinds of requests, alternating: ``none`` (``custom_params`` turn eviction off: the
plugin's cost alone, what the issue's 5% is about) and ``snapkv`` (evicted to 10%: less KV to read, so faster
attention, plus the compacted view). A round sends ``B`` requests at once (each its own random prompt: no prefix
hits), each asking ``--new-tokens`` tokens with ``ignore_eos``, streamed token by token. Its step time is measured
over one window for all of them: from the last request's first token to the first request's last token, when every
request decodes (no prefill in between); per request, the window over the tokens it received in it; the round's
value is the median over requests. ``--rounds`` rounds per (kind, batch) after a warm-up round; reported: median,
min and max over rounds, and the overhead against ``plain`` (and ``plain-sched``) at the same batch.

Writes ``decode_overhead.json`` (command, device, versions, date, settings, per config its server command and
every round) after each server, and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import threading
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
from bench.workloads import DEFAULT_VOCAB

PORT = 31600
PLAIN_ENV = {"SGLANG_PLUGINS": "not-sgl-evict"}
#: config -> (extra server flags, environment, request kinds)
CONFIGS = {
    "plain": ([], PLAIN_ENV, ("plain",)),
    "plain-sched": (["--disable-overlap-schedule", "--disable-prefill-cuda-graph"], PLAIN_ENV, ("plain",)),
    "evict": (["--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--disable-overlap-schedule"], {},
              ("none", "snapkv")),
    # the opt-in keeps the scheduler on where eviction would turn it off (fa3, pages): the name always holds
    "evict-overlap": (["--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1"],
                      {"SGL_EVICT_EXPERIMENTAL_OVERLAP": "1"}, ("none", "snapkv")),
}


@dataclass(frozen=True)
class Round:
    """``batch`` requests of one ``kind`` sent at once; ``index`` < 0: a warm-up round (not reported)."""

    kind: str
    batch: int
    index: int


def plan_rounds(kinds, batches, rounds: int, split_batch: int | None = None) -> list[Round]:
    """A warm-up round per (batch, kind), then ``rounds`` rounds with the kinds alternating, so drift hits all.

    ``split_batch``: a first warm-up round per kind whose prompts overflow one prefill chunk, so one request is
    split across two prefill batches and the kernels of a prefill with a prefix compile before anything is timed
    (on the H100 that first compile stalled a measured round by 7 s, 2026-12-07)."""
    split = [Round(k, split_batch, -1) for k in kinds] if split_batch else []
    return (split + [Round(k, b, -1) for b in batches for k in kinds]
            + [Round(k, b, r) for b in batches for r in range(rounds) for k in kinds])


def chunk_split_batch(chunk_tokens: int, prompt_len: int) -> int:
    """The fewest prompts of ``prompt_len`` tokens sent at once that one prefill chunk cannot hold whole."""
    return chunk_tokens // prompt_len + 1


def step_time(records: list[serve_bench.RequestRecord]) -> dict | None:
    """The decode step time of one round: the window from the last first token to the first last token (every
    request decoding), per request that window over the tokens it received in it, median over requests. None when
    a request failed or the window holds no token of some request."""
    if not records or any(r.error or not r.events for r in records):
        return None
    start = max(next(t for t, n in r.events if n > 0) for r in records)
    end = min(r.events[-1][0] for r in records)

    def tokens_at(record, t):
        return max((n for when, n in record.events if when <= t), default=0)
    counts = [tokens_at(r, end) - tokens_at(r, start) for r in records]
    if end <= start or min(counts) < 1:
        return None
    steps = [(end - start) / n for n in counts]
    return {"step_s": statistics.median(steps), "window_s": end - start, "tokens": counts}


def send_round(port: int, rnd: Round, prompts: list[list[int]], new_tokens: int) -> list[serve_bench.RequestRecord]:
    """``rnd.batch`` streamed requests at once (one thread each)."""
    custom = None if rnd.kind == "plain" else {"kv_evict": {"policy": rnd.kind}}
    records = [serve_bench.RequestRecord(i, 0, 0.0, len(p), new_tokens, events=[]) for i, p in enumerate(prompts)]
    streams = serve_bench.OpenStreams()
    threads = [threading.Thread(target=serve_bench.stream_generate,
                                args=(port, rec, p, float("inf"), streams, 600.0), kwargs={"custom_params": custom})
               for rec, p in zip(records, prompts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records


def prompts_for(config: str, rnd: Round, length: int, seed: int) -> list[list[int]]:
    """Random prompts, different for every config, round and request (no prefix-cache hits)."""
    rng = random.Random(f"{seed}/{config}/{rnd}")
    return [[rng.randrange(*DEFAULT_VOCAB) for _ in range(length)] for _ in range(rnd.batch)]


def summarize(configs: dict) -> dict:
    """``"{config}/{kind}/{batch}"`` -> median, min and max step time (s) over the measured rounds, and the
    overhead of the median against ``plain`` and ``plain-sched`` at the same batch (a fraction), where they ran."""
    out = {}
    for name, entry in configs.items():
        groups: dict[str, list[float]] = {}
        for row in entry.get("rounds", []):
            if row["index"] >= 0 and row["measured"] is not None:
                groups.setdefault(f"{name}/{row['kind']}/{row['batch']}", []).append(row["measured"]["step_s"])
        for key, steps in groups.items():
            out[key] = {"rounds": len(steps), "median_s": statistics.median(steps), "min_s": min(steps),
                        "max_s": max(steps)}
    for key, row in out.items():
        batch = key.rsplit("/", 1)[1]
        for base in ("plain", "plain-sched"):
            ref = out.get(f"{base}/plain/{batch}")
            row[f"overhead_vs_{base}"] = None if ref is None else row["median_s"] / ref["median_s"] - 1
    return out


def markdown_table(summary: dict, batches: list[int]) -> str:
    """Rows config / kind, a column per batch: median ms per step (min-max) and the overhead against plain."""
    keys = sorted({k.rsplit("/", 1)[0] for k in summary})
    lines = ["| config / requests | " + " | ".join(f"batch {b}: ms/step (min-max), vs plain" for b in batches) + " |",
             "| --- |" + " --- |" * len(batches)]
    for key in keys:
        cells = []
        for b in batches:
            row = summary.get(f"{key}/{b}")
            if row is None:
                cells.append("not run")
                continue
            over = row["overhead_vs_plain"]
            cells.append(f"{1e3 * row['median_s']:.2f} ({1e3 * row['min_s']:.2f}-{1e3 * row['max_s']:.2f}), "
                         + ("-" if over is None else f"{100 * over:+.1f}%")
                         + (f" ({row['rounds']} rounds)" if row["rounds"] < 3 else ""))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge_reports(reports: list[dict]) -> dict:
    """One report from the reports of several calls on one device (a call holds at most 10 minutes, so the configs
    of one comparison may be split): their servers side by side, the summary recomputed across them, each call's
    command, date, commit and settings kept. Refuses reports from different devices or repeating a config."""
    devices = {r.get("device") for r in reports}
    if len(devices) != 1:
        raise ValueError(f"reports from different devices {sorted(map(str, devices))}: their timings do not compare")
    configs: dict = {}
    for call, report in enumerate(reports):
        for name, entry in report["configs"].items():
            if name in configs:
                raise ValueError(f"config {name!r} is in more than one report")
            configs[name] = {**entry, "call": call}
    calls = [{k: r.get(k) for k in ("command", "date", "commit", "versions", "settings")} | {
        "configs": list(r["configs"])} for r in reports]
    return {"device": devices.pop(), "driver": reports[0].get("driver"), "model": reports[0].get("model"),
            "calls": calls, "configs": configs, "summary": summarize(configs)}


def serve(name: str, server_args: list[str], env: dict, rounds: list[Round], args, out: Path,
          stop_at: float) -> dict:
    """One server: started, warmed up, its rounds sent until ``stop_at`` (``time.monotonic()``), stopped."""
    server = ServerProcess(name, PORT, server_args, env, out)
    entry = {"server_command": server.cmd, "env": env, "rounds": []}
    try:
        entry["healthy_after_s"] = server.wait_healthy(args.start_timeout)
        if entry["healthy_after_s"] is None:
            entry["error"] = "not healthy"
            return entry
        entry["warmup_s"] = warm_up(PORT, DEFAULT_VOCAB, warm_up_lengths(args.prompt_len))
        for i, rnd in enumerate(rounds):
            if time.monotonic() > stop_at:
                entry["stopped_at_deadline_after"] = i
                break
            records = send_round(PORT, rnd, prompts_for(name, rnd, args.prompt_len, args.seed), args.new_tokens)
            measured = step_time(records)
            errors = [r.error for r in records if r.error]
            entry["rounds"].append({"kind": rnd.kind, "batch": rnd.batch, "index": rnd.index, "measured": measured,
                                    "errors": errors[:3], "ttft_s": [r.ttft_s for r in records]})
            step = "-" if measured is None else f"{1e3 * measured['step_s']:.2f} ms"
            print(f"[decode_overhead] {name} {rnd.kind} batch {rnd.batch} round {rnd.index}: {step}"
                  + (f" ({len(errors)} errors: {errors[0]})" if errors else ""), flush=True)
        entry["alive_at_end"] = server.proc.poll() is None
    finally:
        server.stop()
        wait_gpu_released(STOP_MARGIN_S)
    return entry


def warm_up_lengths(prompt_len: int) -> tuple[int, ...]:
    """The warm-up prompts: a short one and one as long as the rounds' (the context holds no more)."""
    return (min(1024, prompt_len), prompt_len)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="merge these decode_overhead.json files (one device) into OUT/decode_overhead.json")
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-3.1-8b")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--attention-backend", default="flashinfer")
    parser.add_argument("--mem-fraction-static", type=float, default=0.8)
    parser.add_argument("--chunked-prefill-size", type=int, default=8192,
                        help="the servers' (SGLang's default on an H100); the warm-up overflows one chunk")
    parser.add_argument("--start-timeout", type=float, default=360)
    parser.add_argument("--seed", type=int, default=20261207)
    parser.add_argument("--commit", default="", help="the sgl-evict commit being run (the host has no .git)")
    parser.add_argument("--deadline", type=float, default=float("inf"),
                        help="seconds for the whole script: no round starts after it (the JSON says how far it got)")
    args = parser.parse_args(argv)
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown} (known: {', '.join(CONFIGS)})")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error("--batches takes comma-separated integers")
    if min(batches) < 1 or args.rounds < 1 or args.prompt_len < 1 or args.new_tokens < 8:
        parser.error("--batches, --rounds and --prompt-len must be positive, --new-tokens at least 8")
    if args.chunked_prefill_size < 1:
        parser.error("--chunked-prefill-size must be positive")
    args.config_list, args.batch_list = configs, batches
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge_files(args.merge, Path(args.out))
    check_setup()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = write_model_config(args.model)
    biggest = max(args.batch_list)
    common = ["--model-path", str(model), "--load-format", "dummy", "--skip-tokenizer-init",
              "--context-length", str(args.prompt_len + args.new_tokens + 64),
              "--mem-fraction-static", str(args.mem_fraction_static), "--attention-backend", args.attention_backend,
              "--max-running-requests", str(biggest), "--cuda-graph-max-bs", str(biggest),
              "--chunked-prefill-size", str(args.chunked_prefill_size)]
    report = {"command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "device": gpu_query("name"), "driver": gpu_query("driver_version"),
        "versions": {m: _version(m) for m in ("sglang", "torch", "flashinfer", "triton", "sgl_evict")},
        "commit": args.commit, "model": args.model,
        "settings": {k: v for k, v in vars(args).items() if k not in ("config_list", "batch_list")}, "configs": {}}
    stop_at = time.monotonic() + args.deadline
    for name in args.config_list:
        extra, env, kinds = CONFIGS[name]
        if time.monotonic() > stop_at:
            report["configs"][name] = {"error": "not started: deadline reached", "rounds": []}
        else:
            rounds = plan_rounds(kinds, args.batch_list, args.rounds,
                                 chunk_split_batch(args.chunked_prefill_size, args.prompt_len))
            report["configs"][name] = serve(name, [*common, *extra], env, rounds, args, out, stop_at)
        report["summary"] = summarize(report["configs"])  # after each server: a cut call keeps what finished
        (out / "decode_overhead.json").write_text(json.dumps(report, indent=1))
    print(markdown_table(report["summary"], args.batch_list))
    failed = [name for name, entry in report["configs"].items() if "error" in entry]
    if failed:
        print(f"[decode_overhead] failed servers: {failed}")
        return 1
    return 0


def merge_files(paths: list[str], out: Path) -> int:
    try:
        reports = [json.loads(Path(p).read_text()) for p in paths]
        merged = merge_reports(reports)
    except (OSError, ValueError, KeyError) as err:
        print(f"decode_overhead --merge: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_overhead.json").write_text(json.dumps(merged, indent=1))
    batches = sorted({int(k.rsplit("/", 1)[1]) for k in merged["summary"]})
    print(markdown_table(merged["summary"], batches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
