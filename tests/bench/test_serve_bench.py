"""bench/serve_bench.py against a stub server on 127.0.0.1 that streams SGLang 0.5.17-format events."""

import asyncio
import json
import time

import pytest
from stub_sglang import ABORT_MARKER, ERROR_MARKER, HANGUP_MARKER, StubSGLang

from bench import serve_bench
from bench.serve_bench import RequestRecord, parse_prometheus, percentiles, run_benchmark, summarize
from bench.workloads import Session, Turn


@pytest.fixture
def stub_factory():
    stubs = []

    def make(**kw):
        stubs.append(StubSGLang(**kw))
        return stubs[-1]

    yield make
    for s in stubs:
        s.close()


def _sessions(n, turns, new=20, reply=5, first=0):
    return [Session(first + s, [Turn([10_000 * (first + s + 1) + 100 * t + j for j in range(new)], reply)
                                for t in range(turns)]) for s in range(n)]


@pytest.mark.parametrize("incremental,stream_interval", [(False, 1), (True, 1), (False, 3), (True, 3)])
def test_sessions_sequential_inside_concurrent_across_and_accounting(stub_factory, incremental, stream_interval):
    stub = stub_factory(ttft_s=0.05, token_s=0.01, incremental=incremental)
    sessions = _sessions(4, 3)
    result = asyncio.run(run_benchmark(stub.port, sessions, concurrency=2, duration_s=30, progress=False,
                                       sample_interval_s=0.05, stream_interval=stream_interval))
    reqs = result["requests"]
    assert len(reqs) == 12 and all(r["finished"] and r["error"] is None and not r["cut"] for r in reqs)
    assert all(r["output_tokens"] == 5 for r in reqs)
    for r in reqs:  # lower bounds only: the stub sleeps at least this long, a loaded machine adds any amount
        assert r["ttft_s"] >= 0.045
        # the stub sleeps 0.05 s, then 0.01 s per token, between the request and its last event; first-to-last
        # gaps are measured on arrival, where a first event delivered late on a loaded machine shrinks them
        assert r["latency_s"] >= 0.045 + 4 * 0.009
        assert r["tpot_s"] == pytest.approx((r["latency_s"] - r["ttft_s"]) / (r["output_tokens"] - 1))

    by_prompt = {tuple(p): (out, t0, t1) for p, out, t0, t1 in stub.calls}
    for s in sessions:
        mine = sorted((r for r in reqs if r["session_id"] == s.session_id), key=lambda r: r["turn"])
        assert [r["turn"] for r in mine] == [0, 1, 2]
        prompt, prev_end = [], 0.0
        for i, (r, turn) in enumerate(zip(mine, s.turns)):
            reply = by_prompt[tuple(prompt)][0] if prompt else []
            prompt = prompt + reply + turn.new_tokens  # what the server must have received
            assert tuple(prompt) in by_prompt, f"session {s.session_id} turn {i}: history not prompt + reply"
            _, t0, t1 = by_prompt[tuple(prompt)]
            assert t0 >= prev_end, "a session's next turn started before the previous reply finished"
            prev_end = t1
            assert r["prompt_tokens"] == len(prompt)
            # the stub caches prompt + output: turn i>0 hits everything but its new tokens
            assert r["cached_tokens"] == (0 if i == 0 else len(prompt) - len(turn.new_tokens))
    assert stub.max_active == 2  # concurrent across sessions, never above --concurrency

    summary = result["summary"]
    assert summary["requests_completed"] == 12 and summary["errors"] == 0
    expected_hit = sum(r["cached_tokens"] for r in reqs) / sum(r["prompt_tokens"] for r in reqs)
    assert summary["cache_hit_rate"] == pytest.approx(expected_hit)
    assert summary["requests_per_s"] == pytest.approx(12 / summary["duration_s"])
    assert summary["duration_s"] < 5  # ended when the sessions ran out, not at the 30 s deadline
    assert summary["output_tokens_per_s"] == pytest.approx(60 / summary["duration_s"])
    assert summary["peak_in_flight"] <= 2 and summary["peak_running_reqs"] == 2
    assert result["samples"] and "num_used_tokens" in result["samples"][0]


def test_deadline_cuts_open_streams_and_counts_tokens_before_it(stub_factory):
    stub = stub_factory(ttft_s=0.01, token_s=0.01)
    start = time.monotonic()
    result = asyncio.run(run_benchmark(stub.port, _sessions(1, 2, reply=2000), concurrency=1, duration_s=0.6,
                                       progress=False))
    assert time.monotonic() - start < 3  # a 20 s generation was not waited for
    (r,) = result["requests"]
    assert r["cut"] and not r["finished"] and r["error"] is None
    assert 10 < r["tokens_in_window"] <= 60
    s = result["summary"]
    assert s["requests_completed"] == 0 and s["requests_cut_at_deadline"] == 1
    assert s["duration_s"] == pytest.approx(0.6, abs=0.05)
    assert s["output_tokens_per_s"] == pytest.approx(r["tokens_in_window"] / s["duration_s"])


def test_error_event_is_recorded_and_ends_the_session(stub_factory):
    stub = stub_factory(ttft_s=0.01, token_s=0.001)
    bad = Session(9, [Turn([ERROR_MARKER, 1, 2], 3), Turn([4, 5], 3)])
    result = asyncio.run(run_benchmark(stub.port, [bad, *_sessions(1, 2)], concurrency=2, duration_s=10,
                                       progress=False))
    bad_reqs = [r for r in result["requests"] if r["session_id"] == 9]
    assert len(bad_reqs) == 1 and "boom" in bad_reqs[0]["error"]
    assert result["summary"]["errors"] == 1 and result["summary"]["requests_completed"] == 2


def test_abort_finish_reason_is_an_error(stub_factory):
    stub = stub_factory(ttft_s=0.01, token_s=0.001)
    aborted = Session(5, [Turn([ABORT_MARKER, 1], 3), Turn([4, 5], 3)])
    result = asyncio.run(run_benchmark(stub.port, [aborted], concurrency=1, duration_s=10, progress=False))
    (r,) = result["requests"]
    assert r["error"] == "aborted: too long" and result["summary"]["requests_completed"] == 0


def test_stream_ending_without_finish_is_an_error(stub_factory):
    stub = stub_factory(ttft_s=0.01, token_s=0.001)
    result = asyncio.run(run_benchmark(stub.port, [Session(3, [Turn([HANGUP_MARKER], 5)])], concurrency=1,
                                       duration_s=10, progress=False))
    (r,) = result["requests"]
    assert r["error"] == "stream ended without a finish_reason" and not r["cut"] and r["output_tokens"] == 1


def test_max_requests_bounds_the_run(stub_factory):
    stub = stub_factory(ttft_s=0.01, token_s=0.001)
    result = asyncio.run(run_benchmark(stub.port, _sessions(5, 3), concurrency=2, duration_s=10, max_requests=4,
                                       progress=False))
    assert len(result["requests"]) == 4 and len(stub.calls) == 4


def test_cli_writes_json(stub_factory, tmp_path):
    stub = stub_factory(ttft_s=0.001, token_s=0.001)
    out = tmp_path / "run.json"
    rc = serve_bench.main(["--port", str(stub.port), "--workload", "agent", "--sessions", "2", "--turns", "2",
                           "--concurrency", "2", "--duration", "20", "--vocab", "100,200", "--out", str(out),
                           "--no-progress"])
    doc = json.loads(out.read_text())
    assert rc == 0 and doc["summary"]["requests_completed"] == 4
    assert doc["config"]["turns"] == 2 and len(doc["requests"]) == 4


def test_percentiles_linear_interpolation():
    p = percentiles([5, 1, 4, 2, 3, None])
    assert p == {"p50": 3, "p90": pytest.approx(4.6), "p99": pytest.approx(4.96)}
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}
    assert percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p99": 7.0}
    np = pytest.importorskip("numpy")
    xs = [0.3, 0.1, 2.5, 0.7, 0.05, 1.1, 0.9]
    got = percentiles(xs)
    for q in (50, 90, 99):
        assert got[f"p{q}"] == pytest.approx(float(np.percentile(xs, q)))


def test_summarize_rates_hits_and_load():
    done = [RequestRecord(0, i, 0.0, 100, 10, output_tokens=10, cached_tokens=40, ttft_s=0.1 * (i + 1),
                          latency_s=1.0 + 0.1 * (i + 1), tokens_in_window=10, finished=True) for i in range(3)]
    cut = RequestRecord(1, 0, 0.0, 50, 10, output_tokens=4, tokens_in_window=4, cut=True)
    err = RequestRecord(2, 0, 0.0, 50, 10, error="HTTP 500")
    samples = [{"t_s": 0, "in_flight": 2, "num_running_reqs": 2, "num_used_tokens": 100},
               {"t_s": 1, "in_flight": 5, "num_running_reqs": 4, "num_used_tokens": 300}, {"t_s": 2, "in_flight": 1}]
    s = summarize([*done, cut, err], 2.0, samples)
    assert s["requests_completed"] == 3 and s["requests_cut_at_deadline"] == 1 and s["errors"] == 1
    assert s["requests_per_s"] == pytest.approx(1.5)
    assert s["output_tokens_per_s"] == pytest.approx(34 / 2)
    assert s["cache_hit_rate"] == pytest.approx(0.4)
    assert s["ttft_s"]["p50"] == pytest.approx(0.2)
    assert s["tpot_s"]["p50"] == pytest.approx(1.0 / 9)
    assert s["peak_in_flight"] == 5 and s["peak_running_reqs"] == 4 and s["mean_running_reqs"] == 3
    assert s["peak_used_kv_tokens"] == 300 and s["mean_used_kv_tokens"] == 200


def test_parse_prometheus_load_gauges():
    text = """# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m",engine_type="unified"} 7.0
sglang:num_used_tokens{model_name="m"} 1234.0
sglang:token_usage{model_name="m"} 0.25
sglang:gen_throughput{model_name="m"} 99.0
"""
    assert parse_prometheus(text) == {"num_running_reqs": 7.0, "num_used_tokens": 1234.0, "token_usage": 0.25}
