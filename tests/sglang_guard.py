"""The import guard of the test modules that import SGLang 0.5.17 (``.ci/sglang-tests.sh`` runs them in
``.venv-sglang``)::

    with sglang_or_skip("sglang's radix cache"):
        from sglang.srt.mem_cache.radix_cache import RadixCache

Any exception inside the block (SGLang not installed, or installed beside a transformers it cannot import with)
skips the module, except under ``SGL_EVICT_REQUIRE_SGLANG=1`` (``.ci/sglang-tests.sh``: a broken install must fail).
"""

import contextlib
import os
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def sglang_or_skip(what: str = "sglang") -> Iterator[None]:
    """Skips the importing module with "``what`` does not import here: ..." when the block raises."""
    try:
        yield
    except Exception as exc:
        if os.environ.get("SGL_EVICT_REQUIRE_SGLANG") == "1":
            raise
        pytest.skip(f"{what} does not import here: {exc}", allow_module_level=True)
