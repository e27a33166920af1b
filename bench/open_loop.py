"""Open-loop multi-turn agent traffic against a running SGLang server, swept over session arrival rates.

    python -m bench.open_loop --port 30000 --rates 0.1,0.2,0.4,0.8 --warmup 30 --window 120 --runs 3 \\
        --out sweep.json

Sessions arrive by a Poisson process at RATE sessions per second (seeded), whatever the server is doing: a slow
server builds a queue instead of slowing its clients, as real users do (bench/serve_bench.py is the closed loop,
which starts a session only when one of ``--concurrency`` ends). A session's turns follow one another: turn i+1 is
sent ``think_s`` seconds after turn i's reply, its prompt holding the whole history (bench/workloads.py:
``open_agent_sessions``: groups of sessions share a 2-8K system prompt, 6-30 turns, 0.5-8K tool outputs,
log-normal answer lengths). Requests stream over bench/serve_bench.py's client.

One **point** is one rate: arrivals for ``warmup + window`` seconds, then ``drain`` seconds in which the requests
already sent may finish, then every open stream is closed and the server's prefix cache flushed (``/flush_cache``)
so the next point starts cold. Only requests **sent inside the window** are measured, so every point of every
server has the same measured window; a request still unanswered after the drain counts as missing its SLO.

- **throughput**: window requests completed, per second of window; output tokens likewise;
- **goodput**: window requests that met the SLO themselves (TTFT <= ``--slo-ttft``, TPOT <= ``--slo-tpot``), per
  second of window; and ``slo_met``: the window's p90 TTFT and p90 TPOT within the SLO (unfinished requests count
  as infinitely late). The sweep's ``best_goodput`` is the highest goodput over its points, and
  ``max_rate_meeting_slo`` the highest rate whose p90s met it;
- latency percentiles, prefix-cache hit rate, and the server's running requests and KV tokens in use (sampled
  every second from ``/v1/loads``).

``--runs N`` repeats the sweep with arrival seeds ``seed, seed + 1, ...`` (the sessions stay the same); the JSON
keeps every run and, per rate, the mean and the spread (min, max) of each headline number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.serve_bench import (OpenStreams, RequestRecord, percentiles, read_server_load, sample_mean, sample_peak,
                               stream_generate)
from bench.workloads import DEFAULT_VOCAB, AgentMix, int_range, next_prompt, open_agent_session

HOST = "127.0.0.1"
#: per-rate headline numbers whose mean and spread over runs the sweep reports
HEADLINES = ("requests_per_s", "goodput_requests_per_s", "output_tokens_per_s", "ttft_p90_s", "tpot_p90_s",
             "cache_hit_rate", "mean_running_reqs", "mean_used_kv_tokens")


@dataclass(frozen=True)
class Slo:
    """A request meets the SLO when its TTFT and its time per output token are both within these (seconds)."""

    ttft_s: float = 2.0
    tpot_s: float = 0.050

    def met_by(self, r: RequestRecord) -> bool:
        return (r.finished and r.error is None and r.ttft_s is not None and r.ttft_s <= self.ttft_s
                and (r.tpot_s is None or r.tpot_s <= self.tpot_s))


@dataclass(frozen=True)
class Point:
    """One rate's timing: arrivals during ``warmup_s + window_s``; measured: requests sent in the window."""

    rate: float
    warmup_s: float
    window_s: float
    drain_s: float

    def __post_init__(self):
        if not (self.rate > 0 and self.window_s > 0 and self.warmup_s >= 0 and self.drain_s >= 0):
            raise ValueError(f"a point needs rate > 0, window > 0, warmup and drain >= 0: {self}")


def arrival_times(rate: float, horizon_s: float, seed: int) -> list[float]:
    """Poisson arrivals at ``rate`` per second in ``[0, horizon_s)``: exponential gaps, seeded by rate and seed."""
    rng = random.Random(f"arrivals:{seed}:{rate}")
    out, t = [], rng.expovariate(rate)
    while t < horizon_s:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def _p90(values: list[float]) -> float | None:
    """The 90th percentile (linear, as :func:`bench.serve_bench.percentiles`); inf when it reaches an
    unanswered request."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * 0.9
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    if math.isinf(xs[lo]) or (pos > lo and math.isinf(xs[hi])):
        return math.inf
    return percentiles(xs, (90,))["p90"]


def summarize_window(records: list[RequestRecord], point: Point, slo: Slo, samples: list[dict]) -> dict:
    """Aggregates of the requests sent in ``point``'s window (``start_s`` in ``[warmup, warmup + window)``)."""
    lo, hi = point.warmup_s, point.warmup_s + point.window_s
    window = [r for r in records if lo <= r.start_s < hi]
    done = [r for r in window if r.finished and r.error is None]
    answered = {id(r) for r in done}
    # a request not answered by the end counts as infinitely late in the p90s
    ttft = [r.ttft_s if id(r) in answered and r.ttft_s is not None else math.inf for r in window]
    tpot = [r.tpot_s if id(r) in answered else math.inf for r in window if r.max_new_tokens > 1]
    ttft_p90, tpot_p90 = _p90(ttft), _p90(tpot)
    prompt = sum(r.prompt_tokens for r in done if r.cached_tokens is not None)
    cached = sum(r.cached_tokens for r in done if r.cached_tokens is not None)
    in_window = [s for s in samples if lo <= s["t_s"] < hi]

    def mean(key):
        return sample_mean(in_window, key)

    def peak(key):
        return sample_peak(in_window, key)

    return {
        "rate": point.rate, "window_s": point.window_s,
        "requests_sent": len(window), "requests_completed": len(done),
        "requests_unfinished": sum(not r.finished and r.error is None for r in window),
        "errors": sum(r.error is not None for r in window),
        "first_error": next((r.error for r in window if r.error is not None), None),
        "requests_per_s": len(done) / point.window_s,
        "goodput_requests_per_s": sum(slo.met_by(r) for r in window) / point.window_s,
        "output_tokens_per_s": sum(r.output_tokens for r in done) / point.window_s,
        "slo_met": bool(window) and ttft_p90 is not None and ttft_p90 <= slo.ttft_s
        and (tpot_p90 is None or tpot_p90 <= slo.tpot_s),
        "ttft_p90_s": ttft_p90, "tpot_p90_s": tpot_p90,
        "ttft_s": percentiles(r.ttft_s for r in done), "tpot_s": percentiles(r.tpot_s for r in done),
        "latency_s": percentiles(r.latency_s for r in done),
        "prompt_tokens_mean": sum(r.prompt_tokens for r in done) / len(done) if done else None,
        "cache_hit_rate": cached / prompt if prompt else None,
        "retracted_requests": sum(1 for r in window if r.retractions),
        "mean_running_reqs": mean("num_running_reqs"), "peak_running_reqs": peak("num_running_reqs"),
        "mean_waiting_reqs": mean("num_waiting_reqs"),
        "mean_used_kv_tokens": mean("num_used_tokens"), "peak_used_kv_tokens": peak("num_used_tokens"),
        "max_total_kv_tokens": peak("max_total_num_tokens"),
    }


def flush_cache(port: int, timeout_s: float = 60.0) -> bool:
    """``POST /flush_cache`` until SGLang accepts it (it refuses while requests are still running)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            req = urllib.request.Request(f"http://{HOST}:{port}/flush_cache", data=b"", method="POST")
            with urllib.request.urlopen(req, timeout=10) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1.0)
    return False


async def run_point(port: int, point: Point, seed: int, session_seed: int, mix: AgentMix, slo: Slo,
                    vocab: tuple[int, int] = DEFAULT_VOCAB, max_in_flight: int = 1024,
                    stream_interval: int = 1, custom_params: dict | None = None) -> dict:
    """One rate against 127.0.0.1:``port``: ``{"summary", "requests", "samples"}``; ``seed`` draws the
    arrivals, ``session_seed`` the sessions (arrival k is session k). Requests beyond ``max_in_flight`` at
    once are not sent and are recorded as errors (the client's limit, not the server's)."""
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="open-loop")
    streams = OpenStreams()
    t0 = time.monotonic()
    arrivals_end = point.warmup_s + point.window_s
    hard_end = t0 + arrivals_end + point.drain_s
    records: list[RequestRecord] = []
    samples: list[dict] = []
    state = {"in_flight": 0}

    async def run_session(index: int, at: float) -> None:
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        # built on arrival: a session's turns hold up to hundreds of thousands of ids
        session = open_agent_session(index, session_seed, mix, vocab)
        prompt: list[int] = []
        reply: list[int] = []
        for i, turn in enumerate(session.turns):
            if i:
                await asyncio.sleep(turn.think_s)
            start = time.monotonic() - t0
            if start >= arrivals_end:
                return  # the session's later turns fall after the point
            prompt = next_prompt(prompt, reply, turn)
            record = RequestRecord(session.session_id, i, start, len(prompt), turn.max_new_tokens)
            records.append(record)
            if state["in_flight"] >= max_in_flight:
                record.error = f"client limit: {max_in_flight} requests in flight"
                return
            state["in_flight"] += 1
            try:
                await loop.run_in_executor(pool, stream_generate, port, record, prompt, hard_end, streams, 600.0,
                                           stream_interval, custom_params)
            finally:
                state["in_flight"] -= 1
            if not record.finished or record.error:
                return
            reply = record.output_ids

    async def sampler() -> None:
        while True:
            t = time.monotonic() - t0
            load = await loop.run_in_executor(None, read_server_load, port)
            samples.append({"t_s": round(t, 3), "in_flight": state["in_flight"], **(load or {})})
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0 - t)))

    times = arrival_times(point.rate, arrivals_end, seed)
    tasks = [asyncio.create_task(run_session(k, at)) for k, at in enumerate(times)]
    sampling = asyncio.create_task(sampler())
    try:
        done, pending = await asyncio.wait(tasks, timeout=arrivals_end + point.drain_s)
        streams.close_all()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        sampling.cancel()
        pool.shutdown(wait=True)
    return {"summary": summarize_window(records, point, slo, samples), "sessions_arrived": len(times),
            "requests": [r.to_json() for r in records], "samples": samples}


def aggregate(runs: list[list[dict]]) -> list[dict]:
    """Per rate, over runs: the mean, min and max of each :data:`HEADLINES` number, and in how many runs the
    SLO was met. ``runs[i][j]``: run i's summary at rate j (the same rates in every run)."""
    out = []
    for j, first in enumerate(runs[0]):
        row = {"rate": first["rate"], "runs": len(runs),
               "slo_met_runs": sum(bool(run[j]["slo_met"]) for run in runs)}
        for key in HEADLINES:
            vals = [run[j][key] for run in runs if run[j][key] is not None and math.isfinite(run[j][key])]
            row[key] = ({"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
                        if vals else None)
        out.append(row)
    return out


def sweep_headline(per_rate: list[dict]) -> dict:
    """The sweep's two answers: the best mean goodput over its rates, and the highest rate whose p90s met the
    SLO in every run."""
    best = max(per_rate, key=lambda r: (r["goodput_requests_per_s"] or {}).get("mean", -1.0))
    meeting = [r["rate"] for r in per_rate if r["slo_met_runs"] == r["runs"]]
    return {"best_goodput_requests_per_s": best["goodput_requests_per_s"], "at_rate": best["rate"],
            "max_rate_meeting_slo": max(meeting) if meeting else None}


async def run_sweep(port: int, rates: list[float], runs: int, warmup_s: float, window_s: float, drain_s: float,
                    seed: int, mix: AgentMix, slo: Slo, vocab: tuple[int, int] = DEFAULT_VOCAB,
                    flush: bool = True, progress=None, **kw) -> dict:
    """Every rate, ``runs`` times (run r's arrivals: seed ``seed + r``; sessions: ``seed``), flushing the
    prefix cache after each point; ``progress(text)`` is told of each point done."""
    points = [Point(rate, warmup_s, window_s, drain_s) for rate in rates]
    results: list[list[dict]] = []
    for r in range(runs):
        row = []
        for point in points:
            result = await run_point(port, point, seed + r, seed, mix, slo, vocab, **kw)
            result["run"] = r
            result["flushed"] = flush and await asyncio.get_running_loop().run_in_executor(None, flush_cache, port)
            row.append(result)
            if progress:
                s = result["summary"]
                progress(f"run {r + 1}/{runs} rate {point.rate}/s: {s['requests_completed']} done, "
                         f"{s['requests_per_s']:.2f} req/s, goodput {s['goodput_requests_per_s']:.2f}, "
                         f"TTFT p90 {s['ttft_p90_s']}, TPOT p90 {s['tpot_p90_s']}")
        results.append(row)
    per_rate = aggregate([[p["summary"] for p in row] for row in results])
    return {"per_rate": per_rate, "headline": sweep_headline(per_rate), "runs": results}


def _floats(text: str, flag: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"open_loop: {flag}: comma-separated numbers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise SystemExit(f"open_loop: {flag}: give positive numbers, got {text!r}")
    return vals


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The sweep's and the workload's flags (shared with bench/gpu/open_loop.py)."""
    d = AgentMix()
    parser.add_argument("--rates", default="0.1,0.2,0.4,0.8", help="session arrival rates per second")
    parser.add_argument("--runs", type=int, default=3, help="sweeps, each with its own arrival seed (default 3)")
    parser.add_argument("--warmup", type=float, default=30, help="seconds of arrivals before the window (30)")
    parser.add_argument("--window", type=float, default=120, help="measured seconds per rate (120)")
    parser.add_argument("--drain", type=float, default=30, help="seconds for the window's requests to end (30)")
    parser.add_argument("--seed", type=int, default=0, help="sessions; arrivals use seed + run (default 0)")
    parser.add_argument("--slo-ttft", type=float, default=2.0, help="seconds (default 2.0)")
    parser.add_argument("--slo-tpot", type=float, default=0.050, help="seconds per output token (default 0.050)")
    parser.add_argument("--system-tokens", default=f"{d.system_tokens[0]},{d.system_tokens[1]}")
    parser.add_argument("--group-size", type=int, default=d.group_size, help="sessions sharing a system prompt")
    parser.add_argument("--turns", default=f"{d.turns[0]},{d.turns[1]}", help="turns per session, LOW,HIGH")
    parser.add_argument("--tool-tokens", default=f"{d.tool_tokens[0]},{d.tool_tokens[1]}")
    parser.add_argument("--reply-median", type=int, default=d.reply_median, help="answer tokens, median")
    parser.add_argument("--think-mean", type=float, default=d.think_mean_s, help="seconds between turns, mean")
    parser.add_argument("--vocab", default=f"{DEFAULT_VOCAB[0]},{DEFAULT_VOCAB[1]}", help="LO,HI token id range")
    parser.add_argument("--max-in-flight", type=int, default=1024, help="the client's own limit")
    parser.add_argument("--no-flush", action="store_true", help="keep the prefix cache between points")


def workload_from_args(args) -> tuple[list[float], AgentMix, Slo, tuple[int, int]]:
    """The rates, mix, SLO and vocabulary the flags ask for; SystemExit naming the flag on a bad value."""
    rates = _floats(args.rates, "--rates")
    try:
        mix = AgentMix(system_tokens=int_range(args.system_tokens, "--system-tokens"), group_size=args.group_size,
                       turns=int_range(args.turns, "--turns"), tool_tokens=int_range(args.tool_tokens, "--tool-tokens"),
                       reply_median=args.reply_median, think_mean_s=args.think_mean)
        mix.validate()
        Point(rates[0], args.warmup, args.window, args.drain)
        vocab = int_range(args.vocab, "--vocab")
    except ValueError as err:
        raise SystemExit(f"open_loop: {err}") from None
    if args.runs < 1:
        raise SystemExit("open_loop: --runs: at least 1")
    return rates, mix, Slo(args.slo_ttft, args.slo_tpot), vocab


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="server on 127.0.0.1:PORT")
    add_workload_args(parser)
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    rates, mix, slo, vocab = workload_from_args(args)
    result = asyncio.run(run_sweep(args.port, rates, args.runs, args.warmup, args.window, args.drain, args.seed,
                                   mix, slo, vocab, flush=not args.no_flush, max_in_flight=args.max_in_flight,
                                   progress=lambda text: print(f"[open_loop] {text}", file=sys.stderr)))
    result["config"] = {**vars(args), "rates": rates, "mix": asdict(mix), "slo": asdict(slo),
                        "command": "python -m bench.open_loop " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"per_rate": result["per_rate"], "headline": result["headline"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
