"""bench/gpu/soak.py's CPU-checkable parts: refusals before any server, the server log's checks."""

import json

import pytest

from bench.gpu import soak


@pytest.mark.parametrize("flags, text", [(["--configs", "page1,fa3"], "fa3"), (["--configs", ""], "(none given)"),
                                         (["--overrides", "laq"], "--overrides")])
def test_bad_flags_are_refused_before_any_server_starts(monkeypatch, flags, text):
    monkeypatch.setattr(soak, "check_setup", lambda: pytest.fail("reached the server setup"))
    with pytest.raises(SystemExit) as err:
        soak.main(flags)
    assert text in str(err.value)


def test_log_checks_count_tracebacks_leaks_and_evictions(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("sgl-evict: request a kept 10 of 100 tokens, freed 90 slots, hid 0\n"
                   "Traceback (most recent call last):\nValueError: token_to_kv_pool_allocator memory leak detected!\n")
    checks = soak.log_checks(log)
    assert checks["tracebacks"] == 1 and checks["leak_lines"] == 1 and checks["evictions_logged"] == 1
    log.write_text("sgl-evict: request a kept 10 of 100 tokens, freed 90 slots, hid 0\n")
    assert soak.log_checks(log)["tracebacks"] == soak.log_checks(log)["leak_lines"] == 0


def test_configs_name_their_server_flags():
    assert "--page-size" in soak.CONFIGS["page16"] and "16" in soak.CONFIGS["page16"]
    assert soak.CONFIGS["per_layer"][:2] == ["--attention-backend", "triton"]


def test_a_config_without_time_left_is_skipped_saying_what_it_needs(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(soak, "check_setup", lambda: None)
    monkeypatch.setattr(soak, "write_model_config", lambda name: tmp_path / "model")
    monkeypatch.setattr(soak, "gpu_query", lambda field: "no GPU")
    monkeypatch.setattr(soak, "ServerProcess", lambda *a, **k: pytest.fail("started a server without time for it"))
    rc = soak.main(["--configs", "per_layer", "--duration", "45", "--deadline", "100", "--out", str(tmp_path)])
    error = json.loads((tmp_path / "soak.json").read_text())["configs"]["per_layer"]["error"]
    assert rc == 1
    assert f"needs {45 + 120 + soak.STOP_MARGIN_S} s" in error and "45 s of soak" in error
    assert error in capsys.readouterr().err
