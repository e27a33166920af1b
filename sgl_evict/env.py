"""sgl-evict's environment settings, ``SGL_EVICT_<NAME>``, read inside SGLang's processes too.

SGLang 0.5.17 (``sglang/srt/environ.py``, at import in every process) takes each ``SGL_*`` variable for a deprecated
spelling of ``SGLANG_*``: it warns "Environment variable SGL_EVICT_... is deprecated, please use SGLANG_EVICT_..."
and copies the value over. Both spellings are read here, so a user who follows that warning keeps the setting.
"""

from __future__ import annotations

import os


def env_setting(name: str, default: str = "") -> str:
    """The value of ``name`` (``SGL_EVICT_...``), else of its ``SGLANG_EVICT_...`` spelling, else ``default``."""
    if not name.startswith("SGL_EVICT_"):
        raise ValueError(f"not an sgl-evict setting: {name}")
    for key in (name, "SGLANG_" + name[len("SGL_"):]):
        value = os.environ.get(key)
        if value is not None:
            return value
    return default
