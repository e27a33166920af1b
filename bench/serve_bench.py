"""Drives a running SGLang server's ``/generate`` with seeded sessions and measures throughput and latency.

    python -m bench.serve_bench --port 30000 --workload agent --concurrency 32 --duration 120 --out run.json

Standard library only (the GPU host has no aiohttp): asyncio schedules the sessions, each request streams over
``http.client`` in a worker thread. Up to ``--concurrency`` sessions run at once; inside a session, turn i+1 is sent
after turn i's reply arrived and its prompt contains that reply (bench/workloads.py: ``next_prompt``), so the radix
cache can serve the whole history. Requests go to 127.0.0.1 only, as token ids (servers run with
``--skip-tokenizer-init``), greedy, ``ignore_eos``: every reply has exactly its ``max_new_tokens``.

Streaming format, read from SGLang 0.5.17 (``entrypoints/http_server.py``: ``generate_request``;
``managers/tokenizer_manager.py``: ``_handle_batch_output``): the body is ``data: {json}\\n\\n`` events ending with
``data: [DONE]``; each event has ``output_ids`` and ``meta_info`` (``prompt_tokens``, ``cached_tokens``,
``completion_tokens``, ``finish_reason``, ``num_retractions``). ``output_ids`` are cumulative by default and the
delta with ``--incremental-streaming-output``; ``completion_tokens`` is the running total in both, which tells
them apart. An error mid-stream arrives as ``data: {"error": {...}}``.

Server load is sampled every second from ``/v1/loads?include=core`` (0.5.17: ``entrypoints/v1_loads.py``, no
flag needed; the scheduler republishes it at every prefill and every 15 decode steps), falling back to the
Prometheus text of ``/metrics`` (needs ``--enable-metrics``: ``sglang:num_running_reqs``, ``sglang:num_used_tokens``,
...). ``num_used_tokens`` counts KV slots held by requests, not the radix cache's evictable ones.

The run is bounded by ``--duration`` seconds and ``--max-requests``: at the deadline no new request starts and the
open streams are closed (SGLang aborts a request whose client went away); rates count what arrived before it.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import re
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from bench.workloads import DEFAULT_VOCAB, Session, agent_sessions, long_context_requests, next_prompt

HOST = "127.0.0.1"
QUANTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """One ``/generate`` call; times in seconds, ``start_s`` since the run began."""

    session_id: int
    turn: int
    start_s: float
    prompt_tokens: int
    max_new_tokens: int
    output_tokens: int = 0
    cached_tokens: int | None = None  # meta_info.cached_tokens: prompt tokens served from the prefix cache
    ttft_s: float | None = None  # request sent -> first output token received
    latency_s: float | None = None  # request sent -> last event received
    tokens_in_window: int = 0  # output tokens received before the run's deadline
    finished: bool = False  # the server reported a finish_reason
    cut: bool = False  # still streaming at the deadline, closed by the client
    error: str | None = None
    retractions: int | None = None  # meta_info.num_retractions: times the scheduler evicted it to free KV
    output_ids: list[int] = field(default_factory=list, repr=False)
    # (time.monotonic(), output tokens so far) of each event, when the caller sets a list here (decode step times)
    events: list[tuple[float, int]] | None = field(default=None, repr=False)

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (latency - TTFT) / (output tokens - 1)."""
        if not self.finished or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        d = asdict(self)
        del d["output_ids"], d["events"]
        d["tpot_s"] = self.tpot_s
        return d


class OpenStreams:
    """The connections now streaming, so that the deadline can close them from another thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._conns: set[http.client.HTTPConnection] = set()
        self.closed = False

    def add(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._conns.add(conn)

    def discard(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def close_all(self) -> None:
        with self._lock:
            self.closed = True
            for conn in self._conns:
                if conn.sock is not None:
                    try:  # shutdown wakes the thread blocked in readline; close alone would not
                        conn.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass


def stream_generate(port: int, record: RequestRecord, prompt: list[int], deadline: float, streams: OpenStreams,
                    timeout_s: float = 600.0, stream_interval: int = 1,
                    custom_params: dict | None = None, rid: str | None = None) -> RequestRecord:
    """Sends ``prompt`` with ``stream: true`` and fills ``record`` from the events (blocking: run it in a thread).

    ``deadline`` is a ``time.monotonic()`` value: tokens after it are not counted in ``tokens_in_window``.
    ``stream_interval`` > 1 asks SGLang for an event every that many tokens (the first token and the last are
    still sent at once, so TTFT and TPOT stay exact), for when the client's CPU would otherwise limit it.
    ``custom_params``: the request's ``sampling_params.custom_params`` (e.g. ``{"kv_evict": {"policy": "none"}}``).
    ``rid``: the request id SGLang logs it under (None: SGLang draws one).
    """
    params = {"max_new_tokens": record.max_new_tokens, "temperature": 0, "ignore_eos": True}
    if stream_interval != 1:
        params["stream_interval"] = stream_interval
    if custom_params is not None:
        params["custom_params"] = custom_params
    payload = {"input_ids": prompt, "stream": True, "sampling_params": params}
    if rid is not None:
        payload["rid"] = rid
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    streams.add(conn)
    try:
        _read_events(conn, payload, record, deadline, streams)
    except (OSError, http.client.HTTPException, ValueError) as err:
        if not streams.closed:
            record.error = repr(err)
    finally:
        streams.discard(conn)
        conn.close()
    record.cut = streams.closed and not record.finished and record.error is None
    if not streams.closed and not record.finished and record.error is None:
        record.error = "stream ended without a finish_reason"
    record.output_tokens = len(record.output_ids)
    return record


def _read_events(conn: http.client.HTTPConnection, payload: dict, record: RequestRecord, deadline: float,
                 streams: OpenStreams) -> None:
    body = json.dumps(payload)  # before the clock starts: a 50K-token prompt takes milliseconds to encode
    sent = time.monotonic()
    conn.request("POST", "/generate", body, {"Content-Type": "application/json"})
    if streams.closed:  # the deadline passed while connecting: close_all may have missed this socket
        return
    resp = conn.getresponse()
    if resp.status != 200:
        record.error = f"HTTP {resp.status}: {resp.read()[:300]!r}"
        return
    while True:  # to the end of the stream: closing it early would look like a client abort to the server
        line = resp.readline()
        if not line:
            return
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        if record.finished:
            continue
        event = json.loads(data)
        now = time.monotonic()
        if "error" in event:
            record.error = f"server: {event['error']}"
            return
        _apply_event(record, event)
        if record.events is not None:
            record.events.append((now, len(record.output_ids)))
        if record.output_ids and record.ttft_s is None:
            record.ttft_s = now - sent
        record.latency_s = now - sent
        if now <= deadline:
            record.tokens_in_window = len(record.output_ids)


def _apply_event(record: RequestRecord, event: dict) -> None:
    ids = event.get("output_ids") or []
    meta = event.get("meta_info") or {}
    total = meta.get("completion_tokens")
    if total is not None and len(ids) == total:
        record.output_ids = list(ids)  # cumulative (SGLang's default)
    else:
        record.output_ids.extend(ids)  # incremental (--incremental-streaming-output)
    if meta.get("cached_tokens") is not None:
        record.cached_tokens = meta["cached_tokens"]
    if meta.get("num_retractions") is not None:
        record.retractions = meta["num_retractions"]
    reason = meta.get("finish_reason")
    if reason is not None:
        record.finished = True
        if isinstance(reason, dict) and reason.get("type") == "abort":  # e.g. the scheduler could not fit it
            record.error = f"aborted: {reason.get('message')}"


_PROM_LINE = re.compile(r"^(sglang:[a-z_]+)(?:\{[^}]*\})?\s+([-+0-9.eE]+|NaN)$")
_PROM_NAMES = {"sglang:num_running_reqs": "num_running_reqs", "sglang:num_queue_reqs": "num_waiting_reqs",
               "sglang:num_used_tokens": "num_used_tokens", "sglang:token_usage": "token_usage",
               "sglang:max_total_num_tokens": "max_total_num_tokens"}
LOAD_KEYS = ("num_running_reqs", "num_waiting_reqs", "num_used_tokens", "token_usage", "max_total_num_tokens")


def parse_prometheus(text: str) -> dict:
    """The load gauges of SGLang's ``/metrics`` text, under the ``/v1/loads`` names."""
    out = {}
    for line in text.splitlines():
        m = _PROM_LINE.match(line.strip())
        if m and m.group(1) in _PROM_NAMES:
            out[_PROM_NAMES[m.group(1)]] = float(m.group(2))
    return out


def read_server_load(port: int, timeout_s: float = 2.0) -> dict | None:
    """``{num_running_reqs, num_waiting_reqs, num_used_tokens, token_usage, max_total_num_tokens}`` or None."""
    for path in ("/v1/loads?include=core", "/metrics"):
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                continue
            if path == "/metrics":
                load = parse_prometheus(body.decode())
                return load or None
            loads = json.loads(body)["loads"]
            # one entry per data-parallel rank: sum the counts, keep the largest usage fraction
            return {k: (max if k == "token_usage" else sum)(l.get(k, 0) for l in loads) for k in LOAD_KEYS}
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            continue
        finally:
            conn.close()
    return None


def percentiles(values: Iterable[float | None], qs: tuple[int, ...] = QUANTILES) -> dict[str, float | None]:
    """``{"p50": ..., ...}`` with linear interpolation between order statistics (numpy's default); None when empty."""
    xs = sorted(v for v in values if v is not None)
    out = {}
    for q in qs:
        if not xs:
            out[f"p{q}"] = None
            continue
        pos = (len(xs) - 1) * q / 100
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        out[f"p{q}"] = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return out


def sample_peak(samples: list[dict], key: str) -> float | None:
    """The largest ``key`` over the load samples that have it, or None."""
    vals = [s[key] for s in samples if s.get(key) is not None]
    return max(vals) if vals else None


def sample_mean(samples: list[dict], key: str) -> float | None:
    """The mean ``key`` over the load samples that have it, or None."""
    vals = [s[key] for s in samples if s.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(records: list[RequestRecord], duration_s: float, samples: list[dict]) -> dict:
    """Aggregates of one run (rates per second of ``duration_s``, latencies in seconds)."""
    done = [r for r in records if r.finished and r.error is None]
    prompt = sum(r.prompt_tokens for r in done if r.cached_tokens is not None)
    cached = sum(r.cached_tokens for r in done if r.cached_tokens is not None)

    def peak(key):
        return sample_peak(samples, key)

    def mean(key):
        return sample_mean(samples, key)

    return {
        "duration_s": duration_s,
        "requests_sent": len(records),
        "requests_completed": len(done),
        "requests_cut_at_deadline": sum(r.cut for r in records),
        "errors": sum(r.error is not None for r in records),
        "requests_per_s": len(done) / duration_s if duration_s > 0 else None,
        "output_tokens_per_s": sum(r.tokens_in_window for r in records) / duration_s if duration_s > 0 else None,
        "prompt_tokens_mean": sum(r.prompt_tokens for r in done) / len(done) if done else None,
        "ttft_s": percentiles(r.ttft_s for r in done),
        "tpot_s": percentiles(r.tpot_s for r in done),
        "latency_s": percentiles(r.latency_s for r in done),
        "cache_hit_rate": cached / prompt if prompt else None,
        "retracted_requests": sum(1 for r in records if r.retractions),
        "peak_in_flight": peak("in_flight"),
        "peak_running_reqs": peak("num_running_reqs"),
        "mean_running_reqs": mean("num_running_reqs"),
        "peak_used_kv_tokens": peak("num_used_tokens"),
        "mean_used_kv_tokens": mean("num_used_tokens"),
        "max_total_kv_tokens": peak("max_total_num_tokens"),
    }


class _Progress:
    """tqdm on a terminal when installed, else a line on stderr every 10 s (a log, e.g. the device's output tail,
    would fill with tqdm's carriage-return updates)."""

    def __init__(self, enabled: bool):
        self.bar, self.last, self.count = None, time.monotonic(), 0
        if not enabled:
            self.enabled = False
            return
        self.enabled = True
        if not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm

            self.bar = tqdm(unit="req", desc="serve_bench", file=sys.stderr)
        except ImportError:
            pass

    def update(self, in_flight: int) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(in_flight=in_flight)
        elif self.enabled and time.monotonic() - self.last > 10:
            self.last = time.monotonic()
            print(f"[serve_bench] {self.count} requests done, {in_flight} in flight", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def run_benchmark(port: int, sessions: Iterable[Session], concurrency: int, duration_s: float,
                        max_requests: int = 100_000, sample_interval_s: float = 1.0,
                        progress: bool = True, stream_interval: int = 1) -> dict:
    """Runs sessions against 127.0.0.1:``port``; returns ``{"summary", "requests", "samples"}`` (see module doc).

    ``samples``: one dict per ``sample_interval_s``: ``t_s`` since the start, the client's ``in_flight`` requests
    and the server's load (``LOAD_KEYS``; absent when the server answered neither endpoint).
    """
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="generate")
    streams = OpenStreams()
    queue: Iterator[Session] = iter(sessions)
    records: list[RequestRecord] = []
    samples: list[dict] = []
    t0 = time.monotonic()
    deadline = t0 + duration_s
    state = {"in_flight": 0, "started": 0}
    bar = _Progress(progress)

    def stopping() -> bool:
        return time.monotonic() >= deadline or state["started"] >= max_requests

    async def run_session(session: Session) -> None:
        prompt: list[int] = []
        reply: list[int] = []
        for i, turn in enumerate(session.turns):
            if stopping():
                return
            prompt = next_prompt(prompt, reply, turn)
            record = RequestRecord(session.session_id, i, time.monotonic() - t0, len(prompt), turn.max_new_tokens)
            records.append(record)
            state["started"] += 1
            state["in_flight"] += 1
            await loop.run_in_executor(pool, stream_generate, port, record, prompt, deadline, streams, 600.0,
                                       stream_interval)
            state["in_flight"] -= 1
            bar.update(state["in_flight"])
            if not record.finished or record.error:
                return  # the next turn would carry a history the server never answered
            reply = record.output_ids

    async def worker() -> None:
        while not stopping():
            session = next(queue, None)
            if session is None:
                return
            await run_session(session)

    async def sampler() -> None:
        while True:
            t = time.monotonic() - t0
            load = await loop.run_in_executor(None, read_server_load, port)
            samples.append({"t_s": round(t, 3), "in_flight": state["in_flight"], **(load or {})})
            await asyncio.sleep(max(0.0, sample_interval_s - (time.monotonic() - t0 - t)))

    async def closer() -> None:
        await asyncio.sleep(duration_s)
        streams.close_all()

    sampling = asyncio.create_task(sampler())
    closing = asyncio.create_task(closer())
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        elapsed = min(time.monotonic(), deadline) - t0
        closing.cancel()
        sampling.cancel()
        bar.close()
        pool.shutdown(wait=True)
    return {"summary": summarize(records, elapsed, samples), "requests": [r.to_json() for r in records],
            "samples": samples}


def make_sessions(workload: str, seed: int, n: int, turns: int, vocab: tuple[int, int]) -> Iterator[Session]:
    """The named workload's sessions (lazy): ``agent`` (``turns`` each) or ``long`` (one turn each)."""
    if workload == "agent":
        return agent_sessions(n, turns, seed, vocab=vocab)
    if workload == "long":
        return long_context_requests(n, seed, vocab=vocab)
    raise ValueError(f"unknown workload {workload!r}: agent or long")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="server on 127.0.0.1:PORT")
    parser.add_argument("--workload", choices=("agent", "long"), default="agent")
    parser.add_argument("--sessions", type=int, default=2000, help="sessions available (started while time lasts)")
    parser.add_argument("--turns", type=int, default=6, help="turns per agent session")
    parser.add_argument("--concurrency", type=int, default=32, help="sessions in flight at once")
    parser.add_argument("--duration", type=float, default=120, help="seconds; open streams are closed at the end")
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", default=f"{DEFAULT_VOCAB[0]},{DEFAULT_VOCAB[1]}", help="LO,HI token id range")
    parser.add_argument("--stream-interval", type=int, default=1, help="tokens per streamed event (SGLang: 1)")
    parser.add_argument("--out", help="write the JSON here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    lo, hi = (int(v) for v in args.vocab.split(","))
    sessions = make_sessions(args.workload, args.seed, args.sessions, args.turns, (lo, hi))
    result = asyncio.run(run_benchmark(args.port, sessions, args.concurrency, args.duration, args.max_requests,
                                       progress=not args.no_progress, stream_interval=args.stream_interval))
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("out", "no_progress")}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    return 0 if result["summary"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
