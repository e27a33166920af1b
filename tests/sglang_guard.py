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


def interpret_triton_without_cuda() -> None:
    """``TRITON_INTERPRET=1`` on a machine without a GPU, so Triton kernels run on CPU tensors; call it before any
    kernel module imports triton (Triton reads the variable then)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
