"""sgl_evict.env: both spellings of a setting, since SGLang tells users to rename SGL_* variables to SGLANG_*."""

import pytest

from sgl_evict.env import env_setting


def test_either_spelling_is_read_and_sgl_evict_wins(monkeypatch):
    monkeypatch.delenv("SGL_EVICT_CHECK_LSE", raising=False)
    monkeypatch.delenv("SGLANG_EVICT_CHECK_LSE", raising=False)
    assert env_setting("SGL_EVICT_CHECK_LSE", "0") == "0"
    monkeypatch.setenv("SGLANG_EVICT_CHECK_LSE", "1")  # what SGLang's deprecation warning asks for
    assert env_setting("SGL_EVICT_CHECK_LSE") == "1"
    monkeypatch.setenv("SGL_EVICT_CHECK_LSE", "0")
    assert env_setting("SGL_EVICT_CHECK_LSE") == "0"


def test_only_sgl_evict_names():
    with pytest.raises(ValueError, match="not an sgl-evict setting"):
        env_setting("SGLANG_PLUGINS")
