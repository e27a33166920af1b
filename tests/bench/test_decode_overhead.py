"""bench/gpu/decode_overhead.py's CPU-checkable parts: the common decode window, rounds against a stub server,
the summary and its table, refusals of bad flags."""

import json
from types import SimpleNamespace

import pytest
from stub_sglang import StubSGLang

from bench import serve_bench
from bench.gpu import decode_overhead as bench


def _record(events, error=None):
    return SimpleNamespace(events=events, error=error)


def test_the_window_runs_from_the_last_first_token_to_the_first_last_token():
    # a: first token at 1.0, then one every 0.1 s; b: first token at 2.0, one every 0.2 s, ends first at 3.0
    a = _record([(1.0 + 0.1 * k, k + 1) for k in range(40)])
    b = _record([(2.0 + 0.2 * k, k + 1) for k in range(6)])
    got = bench.step_time([a, b])
    assert got["window_s"] == pytest.approx(1.0)
    assert got["tokens"] == [10, 5]  # a: 11 at 2.0 -> 21 at 3.0; b: 1 -> 6
    assert got["step_s"] == pytest.approx(0.15)  # the median of a's 0.1 and b's 0.2


def test_a_round_with_a_failed_request_or_no_common_window_is_not_measured():
    good = _record([(1.0, 1), (1.1, 2), (1.2, 3)])
    assert bench.step_time([good, _record([(1.0, 1)], error="HTTP 500")]) is None
    assert bench.step_time([good, _record([(5.0, 1), (5.1, 2)])]) is None  # b starts after a ends
    assert bench.step_time([]) is None


def test_a_round_against_a_stub_server_measures_its_token_interval(monkeypatch):
    stub = StubSGLang(ttft_s=0.05, token_s=0.02)
    records = bench.send_round(stub.port, bench.Round("none", 4, 0), [[5] * 10, [6] * 10, [7] * 10, [8] * 10], 30)
    assert all(r.error is None and r.output_tokens == 30 for r in records) and stub.max_active == 4
    assert bench.step_time(records)["step_s"] == pytest.approx(0.02, rel=0.5)
    assert json.dumps([r.to_json() for r in records])  # the token times stay out of the JSON


def test_plain_requests_carry_no_override_and_evicting_ones_name_their_policy(monkeypatch):
    sent = []
    monkeypatch.setattr(serve_bench, "stream_generate",
                        lambda port, rec, prompt, deadline, streams, timeout, custom_params=None: sent.append(
                            custom_params))
    bench.send_round(1, bench.Round("plain", 1, 0), [[1]], 8)
    bench.send_round(1, bench.Round("snapkv", 2, 0), [[1], [2]], 8)
    assert sent == [None, {"kv_evict": {"policy": "snapkv"}}, {"kv_evict": {"policy": "snapkv"}}]


def test_rounds_warm_up_first_then_alternate_kinds():
    rounds = bench.plan_rounds(("none", "snapkv"), [1, 64], 2)
    assert [r.index for r in rounds[:4]] == [-1] * 4
    assert [(r.kind, r.batch, r.index) for r in rounds[4:8]] == [
        ("none", 1, 0), ("snapkv", 1, 0), ("none", 1, 1), ("snapkv", 1, 1)]


def test_a_chunk_splitting_warm_up_comes_first_per_kind():
    assert bench.chunk_split_batch(8192, 2048) == 5 and bench.chunk_split_batch(8192, 3000) == 3
    rounds = bench.plan_rounds(("none", "snapkv"), [1, 64], 2, split_batch=5)
    assert [(r.kind, r.batch, r.index) for r in rounds[:2]] == [("none", 5, -1), ("snapkv", 5, -1)]
    assert rounds[2:] == bench.plan_rounds(("none", "snapkv"), [1, 64], 2)


def _report(device, configs):
    return {"device": device, "command": "c", "date": "d", "commit": "abc", "settings": {}, "configs": {
        name: {"rounds": [{"kind": kind, "batch": 1, "index": i, "measured": {"step_s": s}}
                          for i, s in enumerate(steps)]} for name, (kind, steps) in configs.items()}}


def test_reports_of_two_calls_merge_into_one_comparison():
    first = _report("H100", {"plain": ("plain", [0.010, 0.010, 0.010])})
    second = _report("H100", {"evict": ("none", [0.012, 0.012, 0.013])})
    merged = bench.merge_reports([first, second])
    assert merged["summary"]["evict/none/1"]["overhead_vs_plain"] == pytest.approx(0.2)
    assert merged["configs"]["evict"]["call"] == 1 and [c["configs"] for c in merged["calls"]] == [["plain"],
                                                                                                    ["evict"]]
    with pytest.raises(ValueError, match="different devices"):
        bench.merge_reports([first, _report("H200", {"evict": ("none", [0.012])})])
    with pytest.raises(ValueError, match="'plain' is in more than one report"):
        bench.merge_reports([first, first])


def test_merge_cli_names_the_problem_instead_of_a_traceback(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps(_report("H100", {"plain": ("plain", [0.01])})))
    (tmp_path / "b.json").write_text(json.dumps(_report("H200", {"evict": ("none", [0.01])})))
    assert bench.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path)]) == 2
    assert "different devices" in capsys.readouterr().err
    assert bench.main(["--merge", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2
    assert bench.main(["--merge", str(tmp_path / "a.json"), "--out", str(tmp_path / "m")]) == 0
    assert "1 rounds" in capsys.readouterr().out  # fewer than 3 rounds is said in the table


def test_the_summary_reports_spread_and_overhead_against_both_plain_servers():
    def rounds(kind, batch, steps):
        return [{"kind": kind, "batch": batch, "index": -1, "measured": {"step_s": 9.0}}] + [
            {"kind": kind, "batch": batch, "index": i, "measured": {"step_s": s}} for i, s in enumerate(steps)]
    configs = {"plain": {"rounds": rounds("plain", 1, [0.010, 0.011, 0.012])},
               "plain-sched": {"rounds": rounds("plain", 1, [0.012, 0.012, 0.012])},
               "evict": {"rounds": rounds("none", 1, [0.0132, 0.0130, 0.0135]) + [
                   {"kind": "none", "batch": 1, "index": 3, "measured": None}]}}
    summary = bench.summarize(configs)
    row = summary["evict/none/1"]
    assert row["rounds"] == 3 and row["median_s"] == 0.0132 and row["min_s"] == 0.0130 and row["max_s"] == 0.0135
    assert row["overhead_vs_plain"] == pytest.approx(0.2) and row["overhead_vs_plain-sched"] == pytest.approx(0.1)
    table = bench.markdown_table(summary, [1, 64])
    assert "| evict/none | 13.20 (13.00-13.50), +20.0% | not run |" in table


@pytest.mark.parametrize("flags, text", [(["--configs", "plain,fa3"], "unknown ['fa3']"),
                                         (["--batches", "1,x"], "comma-separated"),
                                         (["--new-tokens", "4"], "at least 8")])
def test_bad_flags_are_refused_before_any_server_starts(monkeypatch, capsys, flags, text):
    monkeypatch.setattr(bench, "check_setup", lambda: pytest.fail("reached the server setup"))
    with pytest.raises(SystemExit):
        bench.main(flags)
    assert text in capsys.readouterr().err


def test_one_server_end_to_end_against_the_stub(monkeypatch, tmp_path):
    stub = StubSGLang(ttft_s=0.02, token_s=0.005)
    started = []

    class FakeServer:
        def __init__(self, name, port, args, env, out):
            started.append((name, args, env))
            self.cmd, self.proc = "fake " + name, SimpleNamespace(poll=lambda: None)

        def wait_healthy(self, timeout):
            return 1.0

        def stop(self):
            pass
    monkeypatch.setattr(bench, "PORT", stub.port)
    monkeypatch.setattr(bench, "ServerProcess", FakeServer)
    monkeypatch.setattr(bench, "check_setup", lambda: None)
    monkeypatch.setattr(bench, "write_model_config", lambda name: tmp_path / "model")
    monkeypatch.setattr(bench, "gpu_query", lambda field: "no GPU")
    monkeypatch.setattr(bench, "wait_gpu_released", lambda margin: None)
    stub.CONTEXT = 16 + 12 + 64  # the server's --context-length: the warm-up must fit it too
    rc = bench.main(["--configs", "plain,evict-overlap", "--batches", "1,3", "--rounds", "2", "--prompt-len", "16",
                     "--new-tokens", "12", "--chunked-prefill-size", "40", "--out", str(tmp_path), "--commit", "abc"])
    report = json.loads((tmp_path / "decode_overhead.json").read_text())
    assert rc == 0 and report["commit"] == "abc"
    assert [s[0] for s in started] == ["plain", "evict-overlap"]
    assert started[1][2] == {"SGL_EVICT_EXPERIMENTAL_OVERLAP": "1"} and "--kv-evict-policy" in started[1][1]
    assert "--disable-overlap-schedule" not in started[1][1]
    assert set(report["summary"]) == {"plain/plain/1", "plain/plain/3", "evict-overlap/none/1",
                                      "evict-overlap/none/3", "evict-overlap/snapkv/1", "evict-overlap/snapkv/3"}
    assert "--chunked-prefill-size" in started[0][1]
    rounds = report["configs"]["evict-overlap"]["rounds"]
    assert len(rounds) == 2 + 2 * 2 + 2 * 2 * 2  # chunk-splitting warm-ups, warm-ups, then 2 rounds each
    assert [r["batch"] for r in rounds[:2]] == [3, 3]  # 3 prompts of 16 overflow a 40-token chunk
