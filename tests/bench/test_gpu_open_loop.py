"""bench/gpu/open_loop.py's CPU-checkable parts: config names to server flags, refusals before any server."""

import pytest

from bench.gpu import open_loop


@pytest.mark.parametrize("name,flags,plugin", [
    ("plain", [], False),
    ("plain-fp8", ["--kv-cache-dtype", "fp8_e4m3"], False),
    ("plain-hicache", ["--enable-hierarchical-cache"], False),
    ("plain-evict-sched", ["--disable-overlap-schedule"], False),
    ("plain-capped", ["--max-total-tokens", "5000"], False),
    ("evict-laq-0.1", ["--kv-evict-policy", "laq", "--kv-evict-budget", "0.1"], True),
    ("evict-snapkv-0.2", ["--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.2"], True),
    ("evict-snapkv-0.1-restore", ["--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--kv-evict-history",
                                  "restore", "--kv-evict-host-pool-gb", "32"], True),
])
def test_config_names_give_their_server_flags(name, flags, plugin):
    got, env = open_loop.config_server(name, cap=5000)
    assert got == flags
    # plain configs keep the plugin out of SGLang (its entry point is installed on the host)
    assert ("SGLANG_PLUGINS" not in env) == plugin


def test_config_flags_are_copies():
    a, _ = open_loop.config_server("plain-fp8", 1)
    a.append("--x")
    assert open_loop.config_server("plain-fp8", 1)[0] == ["--kv-cache-dtype", "fp8_e4m3"]


@pytest.mark.parametrize("bad", ["fa3", "evict-laq", "evict-LAQ-0.1", "plain-fp16", "evict-snapkv-0.1-reversible"])
def test_an_unknown_config_is_refused_before_any_server_starts(bad, monkeypatch):
    monkeypatch.setattr(open_loop, "check_setup", lambda: pytest.fail("reached the server setup"))
    with pytest.raises(SystemExit) as err:
        open_loop.main(["--configs", f"plain,{bad}"])
    assert "--configs" in str(err.value) and bad in str(err.value)


def test_bad_workload_flags_are_refused_naming_the_flag(monkeypatch):
    monkeypatch.setattr(open_loop, "check_setup", lambda: pytest.fail("reached the server setup"))
    with pytest.raises(SystemExit) as err:
        open_loop.main(["--rates", "-1"])
    assert "--rates" in str(err.value)


def test_sweep_seconds_counts_every_point_and_run():
    assert open_loop.sweep_seconds(4, 2, 20, 60, 20) == 4 * 2 * (20 + 60 + 20 + 5)
