"""bench/throughput_readings.py on hand-made per-request records."""


import pytest

from bench.throughput_readings import (
    prefill_rate,
    prefilled_per_turn,
    rate_in_window,
    readings_table,
    same_work_s,
    steady_state_rate,
)


def _request(session, turn, start, latency, prompt, cached, **flags):
    return {"session_id": session, "turn": turn, "start_s": start, "latency_s": latency, "prompt_tokens": prompt,
            "cached_tokens": cached, "finished": flags.get("finished", True), "cut": flags.get("cut", False),
            "error": flags.get("error")}


def _config(requests, duration):
    return {"summary": {"duration_s": duration}, "requests": requests}


def _plain():
    """Two sessions re-prefilling their whole history: turn t prefills 1000 (t + 1) tokens and takes t + 1 s."""
    reqs, clock = [], {0: 0.0, 1: 0.0}
    for turn in range(3):
        for s in (0, 1):
            reqs.append(_request(s, turn, clock[s], turn + 1.0, 1000 * (turn + 1), 0))
            clock[s] += turn + 1.0
    reqs.append(_request(0, 3, 6.0, 50.0, 4000, 0, finished=False, cut=True))  # cut at the deadline: not counted
    return _config(reqs, 12.0)


def _evict():
    """Same sessions, every turn prefills 1000 tokens (the history cached) in 1 s; five turns each."""
    reqs = [_request(s, t, float(t), 1.0, 1000 * (t + 1), 1000 * t) for s in (0, 1) for t in range(5)]
    reqs.append(_request(1, 5, 5.0, 1.0, 6000, 5000, error="boom"))  # an error: not counted
    return _config(reqs, 6.0)


def test_rate_in_window_counts_requests_ended_by_then():
    plain = _plain()
    assert rate_in_window(plain, 3.0) == pytest.approx(4 / 3)  # turns 0 and 1 of both sessions end by 3 s
    assert rate_in_window(plain, 6.0) == pytest.approx(6 / 6)
    assert rate_in_window(_evict(), 6.0) == pytest.approx(10 / 6)


def test_prefilled_per_turn_and_rate():
    assert prefilled_per_turn(_plain()) == {0: 1000, 1: 2000, 2: 3000}
    assert prefilled_per_turn(_evict()) == {t: 1000 for t in range(5)}
    assert prefill_rate(_plain()) == pytest.approx(12000 / 12)
    # a turn reached by fewer than min_share x turn 0's requests is left out
    few = _config([_request(s, 0, 0, 1, 100, 0) for s in range(20)] + [_request(0, 1, 1, 1, 900, 0)], 10.0)
    assert prefilled_per_turn(few) == {0: 100}
    assert prefilled_per_turn(few, min_share=0.05) == {0: 100, 1: 900}
    # a request whose server reported no cached count is left out of the prefill readings, not counted as 0 cached
    unknown = _config([_request(0, 0, 0, 1, 100, 0), _request(1, 0, 0, 1, 500, None)], 10.0)
    assert prefilled_per_turn(unknown) == {0: 100} and prefill_rate(unknown) == pytest.approx(10.0)


def test_steady_state_extrapolates_missing_turns_linearly():
    rate, guessed = steady_state_rate(_plain(), turns=5)
    # turns 3 and 4 continue 1000, 2000, 3000: 4000 and 5000; session = 15000 tokens at 1000 tokens/s
    assert guessed == 2 and rate == pytest.approx(5 * 1000 / 15000)
    rate, guessed = steady_state_rate(_evict(), turns=5)
    assert guessed == 0 and rate == pytest.approx(5 * (10000 / 6) / 5000)


def test_same_work_is_none_until_every_session_finished_the_turns():
    assert same_work_s(_plain(), sessions=2, last_turn=2) == pytest.approx(6.0)
    assert same_work_s(_plain(), sessions=2, last_turn=3) is None  # turn 3 was cut
    assert same_work_s(_evict(), sessions=2, last_turn=2) == pytest.approx(3.0)


def test_readings_table_compares_over_the_shortest_window_and_common_work():
    doc = {"settings": {"turns": 5, "concurrency": 2}, "configs": {"plain": _plain(), "evict": _evict()}}
    table = readings_table(doc)
    lines = table.splitlines()
    assert "req/s over 6 s" in lines[0] and "turns 0-2 of 2 sessions (s)" in lines[0]
    assert lines[2].startswith("| plain | 12 | 1.00 | 1.0K | 1.0K / 2.0K / 3.0K | 0.33 (2 turns extrapolated) | 6 |")
    assert lines[3].startswith("| evict | 6 | 1.67 | 1.7K |")
    assert "same window 1.67x" in table and "steady state 5.00x" in table and "same work 2.00x" in table
    assert readings_table({"settings": doc["settings"], "configs": {"plain": {"error": "not healthy"}}}) == ""
    assert readings_table({**doc, "settings": {**doc["settings"], "workload": "long"}}) == ""


def test_readings_table_says_when_no_work_was_finished_by_every_config():
    late = _evict()
    for r in late["requests"]:
        if r["session_id"] == 1 and r["turn"] == 0:
            r["cut"] = True
    doc = {"settings": {"turns": 5, "concurrency": 2}, "configs": {"plain": _plain(), "evict": late}}
    table = readings_table(doc)
    assert "same work: none finished by all" in table.splitlines()[0] and "same work " not in table.splitlines()[-1]
