"""bench/gpu/soak.py's CPU-checkable parts: refusals before any server, the server log's checks."""

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
