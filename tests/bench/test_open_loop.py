"""bench/open_loop.py: Poisson arrivals, the open-loop agent mix, window accounting, SLO goodput, the sweep
against the stub SGLang server (tests/stub_sglang.py)."""

import asyncio
import json
import math

import pytest
from stub_sglang import StubSGLang

from bench import open_loop
from bench.open_loop import Point, Slo, aggregate, arrival_times, run_point, run_sweep, summarize_window
from bench.serve_bench import RequestRecord
from bench.workloads import AgentMix, open_agent_session, open_agent_sessions

VOCAB = (100, 5000)
SMALL = AgentMix(system_tokens=(30, 60), group_size=3, turns=(2, 4), tool_tokens=(5, 20),
                 instruction_tokens=(2, 4), reply_median=6, reply_sigma=0.5, reply_tokens=(2, 12), think_mean_s=0.05)


@pytest.fixture
def stub():
    s = StubSGLang(ttft_s=0.02, token_s=0.002)
    yield s
    s.close()


# ---- workload ---------------------------------------------------------------------------------------------------

def test_open_sessions_are_seeded_and_share_a_system_prompt_per_group():
    a = list(open_agent_sessions(7, seed=5, mix=SMALL, vocab=VOCAB))
    assert a == list(open_agent_sessions(7, seed=5, mix=SMALL, vocab=VOCAB))
    assert a != list(open_agent_sessions(7, seed=6, mix=SMALL, vocab=VOCAB))
    assert a[4] == open_agent_session(4, 5, SMALL, VOCAB)  # independent of how many are generated

    def system_of(s):  # the first turn is system + tool + instruction; the tool part differs per session
        return s.turns[0].new_tokens[:30]
    assert system_of(a[0]) == system_of(a[1]) == system_of(a[2])  # group 0
    assert system_of(a[3]) != system_of(a[0])  # group 1 has its own
    assert a[0].turns[0].new_tokens[-8:] != a[1].turns[0].new_tokens[-8:]


def test_open_session_ranges_think_times_and_reply_clipping():
    mix = AgentMix(system_tokens=(0, 0), turns=(6, 30), tool_tokens=(512, 8192), instruction_tokens=(20, 60),
                   reply_median=128, reply_tokens=(16, 1024), think_mean_s=5.0)
    sessions = list(open_agent_sessions(40, seed=1, mix=mix, vocab=VOCAB))
    turns = [len(s.turns) for s in sessions]
    assert min(turns) >= 6 and max(turns) <= 30 and len(set(turns)) > 8
    replies = [t.max_new_tokens for s in sessions for t in s.turns]
    assert min(replies) >= 16 and max(replies) <= 1024 and len(set(replies)) > 50
    assert 60 < sorted(replies)[len(replies) // 2] < 250  # log-normal around its median of 128
    for s in sessions:
        assert s.turns[0].think_s == 0.0
        assert all(512 + 20 <= len(t.new_tokens) <= 8192 + 60 for t in s.turns)
    thinks = [t.think_s for s in sessions for t in s.turns[1:]]
    assert all(x > 0 for x in thinks) and 3.5 < sum(thinks) / len(thinks) < 6.5


@pytest.mark.parametrize("bad", [dict(turns=(0, 3)), dict(turns=(5, 3)), dict(group_size=0),
                                 dict(think_mean_s=-1.0), dict(reply_tokens=(0, 4))])
def test_a_mix_that_makes_no_workload_is_refused(bad):
    with pytest.raises(ValueError):
        list(open_agent_sessions(1, mix=AgentMix(**bad)))


# ---- arrivals and window accounting ------------------------------------------------------------------------------

def test_poisson_arrivals_are_seeded_sorted_and_near_their_rate():
    a = arrival_times(2.0, 1000.0, seed=3)
    assert a == arrival_times(2.0, 1000.0, seed=3) and a != arrival_times(2.0, 1000.0, seed=4)
    assert a == sorted(a) and 0 < a[0] and a[-1] < 1000.0
    assert 1800 < len(a) < 2200  # 2000 expected, sd ~45
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert 0.45 < sum(gaps) / len(gaps) < 0.55


def _rec(start, ttft=0.1, latency=1.0, tokens=11, finished=True, error=None, cached=50, prompt=100):
    r = RequestRecord(0, 0, start, prompt, tokens)
    r.ttft_s, r.latency_s, r.finished, r.error, r.cached_tokens = ttft, latency, finished, error, cached
    r.output_tokens = tokens if finished else 0
    return r


def test_only_requests_sent_in_the_window_count():
    point = Point(rate=1.0, warmup_s=10.0, window_s=20.0, drain_s=5.0)
    records = [_rec(5.0), _rec(10.0), _rec(29.9), _rec(30.0)]
    s = summarize_window(records, point, Slo(), samples=[])
    assert s["requests_sent"] == 2 and s["requests_completed"] == 2
    assert s["requests_per_s"] == pytest.approx(2 / 20)
    assert s["output_tokens_per_s"] == pytest.approx(22 / 20)
    assert s["cache_hit_rate"] == pytest.approx(0.5)


def test_goodput_counts_requests_within_the_slo_and_unfinished_ones_fail_the_p90():
    point = Point(rate=1.0, warmup_s=0.0, window_s=10.0, drain_s=0.0)
    slo = Slo(ttft_s=2.0, tpot_s=0.05)
    fast = [_rec(float(i), ttft=0.5, latency=0.5 + 10 * 0.01) for i in range(9)]  # TPOT 0.01
    slow_tpot = _rec(9.0, ttft=0.5, latency=0.5 + 10 * 0.2)  # TPOT 0.2: misses
    s = summarize_window(fast + [slow_tpot], point, slo, samples=[])
    assert s["goodput_requests_per_s"] == pytest.approx(9 / 10) and s["requests_per_s"] == pytest.approx(1.0)
    assert s["slo_met"]  # p90 over ten requests interpolates between the 9th and 10th
    unfinished = [_rec(float(i), finished=False) for i in range(3)]
    s = summarize_window(fast[:7] + unfinished, point, slo, samples=[])
    assert s["requests_unfinished"] == 3 and math.isinf(s["ttft_p90_s"]) and not s["slo_met"]
    assert s["goodput_requests_per_s"] == pytest.approx(7 / 10)


def test_aggregate_gives_mean_and_spread_over_runs():
    runs = [[{"rate": 1.0, "slo_met": ok, **{k: v for k in open_loop.HEADLINES}}] for v, ok in
            ((1.0, True), (3.0, False), (2.0, True))]
    (row,) = aggregate(runs)
    assert row["runs"] == 3 and row["slo_met_runs"] == 2
    assert row["requests_per_s"] == {"mean": 2.0, "min": 1.0, "max": 3.0, "n": 3}


# ---- against the stub server -------------------------------------------------------------------------------------

def test_a_point_sends_histories_in_order_and_stops_arrivals_after_the_window(stub):
    point = Point(rate=15.0, warmup_s=0.3, window_s=0.7, drain_s=2.0)
    result = asyncio.run(run_point(stub.port, point, seed=1, session_seed=2, mix=SMALL, slo=Slo(), vocab=VOCAB))
    reqs = result["requests"]
    assert result["sessions_arrived"] == len(arrival_times(15.0, 1.0, 1)) > 5
    assert reqs and all(0 <= r["start_s"] < 1.0 for r in reqs)
    assert all(r["finished"] and r["error"] is None for r in reqs)
    by_session = {}
    for r in reqs:
        by_session.setdefault(r["session_id"], []).append(r)
    # within a session, turn t+1 went out after turn t's reply and holds its history (the stub's cache hits it)
    calls = {tuple(p): (out, t0, t1) for p, out, t0, t1 in stub.calls}
    multi = [rs for rs in by_session.values() if len(rs) > 1]
    assert multi
    for rs in multi:
        rs.sort(key=lambda r: r["turn"])
        assert [r["turn"] for r in rs] == list(range(len(rs)))
        for a, b in zip(rs, rs[1:]):
            assert b["start_s"] >= a["start_s"] + a["latency_s"]
            assert b["cached_tokens"] >= a["prompt_tokens"] + a["output_tokens"]
            assert b["prompt_tokens"] > a["prompt_tokens"] + a["output_tokens"]
    prompts = sorted(len(p) for p in calls)
    assert prompts[0] >= 30 + 5 + 2  # every first turn carries its group's system prompt
    s = result["summary"]
    assert s["requests_sent"] == sum(0.3 <= r["start_s"] < 1.0 for r in reqs)
    assert result["samples"] and result["samples"][0]["num_running_reqs"] is not None  # /v1/loads read


def test_requests_still_running_after_the_drain_are_cut_and_fail_the_slo():
    slow = StubSGLang(ttft_s=5.0, token_s=0.01)
    try:
        point = Point(rate=10.0, warmup_s=0.0, window_s=0.5, drain_s=0.3)
        result = asyncio.run(run_point(slow.port, point, seed=1, session_seed=2, mix=SMALL, slo=Slo(),
                                       vocab=VOCAB))
    finally:
        slow.close()
    s = result["summary"]
    assert s["requests_sent"] > 0 and s["requests_completed"] == 0
    assert s["requests_unfinished"] == s["requests_sent"] and not s["slo_met"]
    assert all(r["cut"] for r in result["requests"])


def test_sweep_repeats_every_rate_flushes_between_points_and_reports_the_headline(stub):
    result = asyncio.run(run_sweep(stub.port, [5.0, 10.0], runs=2, warmup_s=0.2, window_s=0.5, drain_s=1.5,
                                   seed=7, mix=SMALL, slo=Slo(ttft_s=1.0, tpot_s=0.05), vocab=VOCAB))
    assert stub.flushes == 4
    assert [len(row) for row in result["runs"]] == [2, 2]
    assert [p["summary"]["rate"] for p in result["runs"][0]] == [5.0, 10.0]
    # run r draws its arrivals with seed + r: the two runs' arrivals differ, their sessions do not
    assert result["runs"][0][1]["sessions_arrived"] == len(arrival_times(10.0, 0.7, 7))
    assert result["runs"][1][1]["sessions_arrived"] == len(arrival_times(10.0, 0.7, 8))
    assert [r["rate"] for r in result["per_rate"]] == [5.0, 10.0]
    assert all(r["runs"] == 2 for r in result["per_rate"])
    head = result["headline"]
    assert head["at_rate"] in (5.0, 10.0) and head["best_goodput_requests_per_s"]["mean"] > 0


def test_goodput_is_zero_when_the_slo_is_tighter_than_the_server(stub):
    result = asyncio.run(run_sweep(stub.port, [10.0], runs=1, warmup_s=0.0, window_s=0.5, drain_s=1.5, seed=1,
                                   mix=SMALL, slo=Slo(ttft_s=0.001, tpot_s=0.05), vocab=VOCAB))
    s = result["runs"][0][0]["summary"]
    assert s["requests_completed"] > 0 and s["goodput_requests_per_s"] == 0 and not s["slo_met"]
    assert result["headline"]["max_rate_meeting_slo"] is None


def test_cli_writes_the_sweep_and_refuses_bad_flags(stub, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    rc = open_loop.main(["--port", str(stub.port), "--rates", "8", "--runs", "1", "--warmup", "0", "--window",
                         "0.4", "--drain", "1", "--system-tokens", "20,40", "--turns", "2,3", "--tool-tokens",
                         "5,10", "--reply-median", "4", "--think-mean", "0.05", "--vocab", "100,5000",
                         "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["rates"] == [8.0] and doc["config"]["command"].startswith("python -m bench.open_loop")
    assert doc["per_rate"][0]["runs"] == 1
    for bad, flag in ((["--rates", "0,1"], "--rates"), (["--rates", "x"], "--rates"), (["--turns", "3"], "--turns"),
                      (["--window", "0"], "window")):
        with pytest.raises(SystemExit) as err:
            open_loop.main(["--port", "1", *bad])
        assert flag in str(err.value)
