"""bench/soak.py against the stub SGLang server (tests/stub_sglang.py): overrides, client aborts, cache flushes,
bad input failing alone (validated by the real sgl_evict override code), and the idle KV check."""

import asyncio
import json

import pytest
from stub_sglang import StubSGLang

from bench import soak
from bench.serve_bench import RequestRecord
from bench.workloads import AgentMix

MIX = AgentMix(system_tokens=(20, 40), group_size=2, turns=(2, 4), tool_tokens=(5, 20), instruction_tokens=(2, 4),
               reply_median=6, reply_sigma=0.5, reply_tokens=(2, 12), think_mean_s=0.05)
VOCAB = (100, 5000)


@pytest.mark.parametrize("text, parsed", [("server", None), ("none", {"policy": "none"}),
                                          ("laq@0.1", {"policy": "laq", "budget": 0.1}),
                                          ("snapkv@256", {"policy": "snapkv", "budget": 256})])
def test_overrides_parse(text, parsed):
    assert soak.parse_override(text) == parsed


@pytest.mark.parametrize("bad", ["laq", "laq@", "@0.1", "laq@lots"])
def test_a_bad_override_is_named(bad):
    with pytest.raises(ValueError, match="--overrides"):
        soak.parse_override(bad)


@pytest.mark.parametrize("status, text, alone", [
    (400, "The input_ids is empty.", True),
    (200, json.dumps({"meta_info": {"finish_reason": {"type": "abort", "message": "kv_evict: budget: ..."}}}), True),
    (200, json.dumps({"output_ids": [1], "meta_info": {"finish_reason": {"type": "length"}}}), False),  # accepted
    (0, "ConnectionResetError()", False),  # the server went away
    (500, "", False),
])
def test_a_bad_input_must_fail_by_itself_with_a_message(status, text, alone):
    assert soak.bad_input_failed_alone(status, text) is alone


def _run(stub, **kw):
    args = dict(duration_s=3.5, rate=4.0, seed=3, mix=MIX, overrides=["server", "none", "laq@0.1"],
                abort_fraction=0.3, flush_every_s=0.7, bad_every_s=0.2, context_len=stub.CONTEXT, vocab=VOCAB,
                idle_timeout_s=10.0, settle_s=2.0)
    args.update(kw)
    return asyncio.run(soak.run_soak(stub.port, **args))


def test_a_soak_against_a_sound_server_passes_every_check():
    stub = StubSGLang(ttft_s=0.05, token_s=0.01)
    try:
        result = _run(stub)
    finally:
        stub.close()
    s = result["summary"]
    assert s["ok"], s
    assert s["client_aborts"] > 0 and len(s["by_override"]) >= 2
    assert set(s["by_override"]) <= {"server", "none", "laq@0.1"}
    aborted = [r for r in result["requests"] if r["client_abort"]]
    assert all(not r["finished"] or r["output_tokens"] <= r["max_new_tokens"] for r in aborted)
    # bad inputs went out in their order while the traffic ran (each one's answer: the test below)
    names = [b["input"] for b in result["bad_inputs"]]
    assert len(names) >= 8 and names[:8] == [name for name, _ in soak.BAD_INPUTS[:8]]
    assert stub.flushes >= 2 and sum(result["flushes"].values()) >= 2
    assert result["idle"]["used_kv_tokens"] == 0 and result["health"].get("failed", 0) == 0


@pytest.mark.parametrize("name", [name for name, _ in soak.BAD_INPUTS])
def test_every_bad_input_fails_alone_with_its_reason(name):
    """Each malformed request against the stub, whose answers come from the plugin's own override validation."""
    stub = StubSGLang()
    try:
        body = dict(soak.BAD_INPUTS)[name](list(range(100, 164)), stub.CONTEXT)
        status, text = soak.post_json(stub.port, "/generate", body)
        alive = soak.healthy(stub.port)
    finally:
        stub.close()
    assert soak.bad_input_failed_alone(status, text) and alive, (status, text)
    expected = {"budget above 1": "budget", "unknown policy": "h2o", "unknown key": "windoww",
                "granularity per request": "set by the server", "empty prompt": "empty",
                "prompt longer than the context": "context length"}
    if name in expected:
        assert expected[name] in text
    if name in ("empty prompt", "prompt longer than the context"):
        assert status == 400


def test_kv_still_in_use_once_idle_fails_the_soak():
    stub = StubSGLang(ttft_s=0.02, token_s=0.005, leak_tokens=64)
    try:
        result = _run(stub, duration_s=1.0, bad_every_s=0.3)
    finally:
        stub.close()
    assert result["idle"]["used_kv_tokens"] == 64
    assert not result["summary"]["checks"]["no KV in use once idle and flushed"] and not result["summary"]["ok"]


def test_a_request_failing_without_an_abort_fails_the_soak():
    good, broken = RequestRecord(0, 0, 0.0, 10, 4), RequestRecord(1, 0, 0.0, 10, 4)
    good.finished = True
    broken.error = "server: {'message': 'boom'}"
    cut = RequestRecord(2, 0, 0.0, 10, 4)  # closed by the client: not a failure
    summary = soak.summarize([(good, "server", False), (broken, "none", False), (cut, "none", True)],
                             [{"failed_alone": True, "healthy_after": True}], {}, {"ok": 3},
                             {"flushed": True, "used_kv_tokens": 0, "healthy": True}, sessions=3)
    assert summary["unexpected_errors"] == {"server: {'message': 'boom'}": 1} and not summary["ok"]
    assert summary["checks"]["every bad input failed alone, server healthy after"]


def test_cli_refuses_bad_flags_naming_them():
    for flags, text in ((["--overrides", "laq"], "--overrides"), (["--turns", "5,2"], "turns"),
                        (["--abort-fraction", "2"], "--abort-fraction")):
        with pytest.raises(SystemExit) as err:
            soak.main(["--port", "1", *flags])
        assert text in str(err.value)


def _first(session, start, override, cached, turn=0):
    return {"session_id": session, "turn": turn, "start_s": start, "override": override, "cached_tokens": cached}


def test_namespace_check_flags_a_first_turn_that_read_another_overrides_prefix():
    rows = [_first(0, 0.0, "none", 0), _first(1, 1.0, "none", 900),      # same namespace: a legitimate hit
            _first(2, 2.0, "laq@0.1", 0),                                # exposed, read nothing: fine
            _first(3, 3.0, "snapkv@0.2", 700),                           # exposed, read 700 tokens: a leak
            _first(4, 0.5, "snapkv@0.2", 12),                            # another group: a chance match
            _first(3, 9.0, "snapkv@0.2", 5000, turn=1)]                  # its own history: not a first turn
    result = soak.namespace_check(rows, group_size=4)
    assert result == {"first_turns": 5, "exposed": 2,
                      "leaks": [{"session_id": 3, "override": "snapkv@0.2", "cached_tokens": 700}]}
    assert soak.namespace_check(rows[:3], group_size=4)["leaks"] == []
