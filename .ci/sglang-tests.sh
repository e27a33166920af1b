#!/usr/bin/env bash
# Runs the tests that import SGLang 0.5.17 itself (tests/sglang/: plugin flags, radix cache with holes, ...) in
# their own venv.
#
# SGLang 0.5.17 pins transformers 5.12.1, which cannot share the project venv (transformers 5.23, needed by the
# evaluation harness), so these tests get .venv-sglang. SGL_EVICT_REQUIRE_SGLANG=1 turns the tests' "sglang does
# not import here" skip into a failure: this script exists to run them, so skipping would hide a broken install.
#
# Usage: bash .ci/sglang-tests.sh   (from any directory; reuses .venv-sglang when it is already complete)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-sglang
PY=$VENV/bin/python

if [ ! -f "$VENV/.complete" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$PY" -m pip install torch==2.13.0
  # imported by SGLang (sglang.srt.utils, the scheduler's Req, the paged allocator) but neither pulled in by the
  # CPU torch wheel nor by .ci/install-sglang-cpu.sh (written for the project venv, which has them), found by
  # importing those modules in a bare venv, pinned. triton: the paged allocator imports its Triton kernels at
  # module level; they are never launched on CPU.
  "$PY" -m pip install --no-deps \
    numpy==2.4.6 triton==3.9.0 psutil==7.2.2 requests==2.34.2 urllib3==2.8.0 idna==3.20 certifi==2026.10.18 \
    packaging==26.3 pillow==13.0.0 tqdm==4.70.1 pygments==2.21.0 pydantic==2.14.3 pydantic_core==2.50.4 \
    typing-inspection==0.4.5 annotated-types==0.8.0 regex==2026.11.15 httpx==0.28.1 httpx2==2.16.2 \
    pyyaml==6.0.3 safetensors==0.8.0 gguf==0.19.0
  PYTHON=$PY bash .ci/install-sglang-cpu.sh
  # sgl-evict itself without dependency resolution (it would pull transformers 5.23 back in), then the test
  # runner, pinned
  "$PY" -m pip install --no-deps -e .
  "$PY" -m pip install --no-deps \
    pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 hypothesis==6.170.15 sortedcontainers==2.4.0
  touch "$VENV/.complete"
fi

status=0
# Triton kernels run on CPU tensors through the interpreter: tests/conftest.py sets TRITON_INTERPRET=1 without a GPU
SGL_EVICT_REQUIRE_SGLANG=1 "$PY" -m pytest -q tests/sglang || status=$?
if [ "$status" -eq 5 ]; then
  echo "sglang-tests: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
