#!/usr/bin/env bash
# Installs SGLang 0.5.17 into the active Python environment so that its server arguments, plugin hook registry,
# radix cache and token allocator import on a CPU-only machine (the plugin's CPU tests need exactly these).
#
# SGLang's own requirements pull CUDA wheels (torch 2.11, flashinfer, sglang-kernel, ...), so SGLang and every
# package that depends on torch go in with --no-deps; the rest is the import-time closure of
#   sglang.srt.server_args, sglang.srt.plugins, sglang.srt.mem_cache.{radix_cache,allocator,memory_pool}
# found by importing them, pinned. The installed torch (CPU) is left as it is.
#
# Two pins are forced by SGLang itself:
# - transformers==5.12.1 (SGLang's pin): SGLang registers configs (e.g. qwen3_asr) that newer transformers
#   already ships, and AutoConfig.register then refuses the import. tokenizers/huggingface-hub follow its bounds.
# - torchvision==0.16.2: sglang.srt.utils.common imports torchvision.io at module level. PyPI's Linux
#   torchvision wheels are CUDA builds; newer ones fail at import beside a CPU torch (their meta registration of
#   torchvision::nms needs the C extension), 0.16.2 skips its ops when the extension cannot load and imports cleanly.
#   No image op is used by the tests.
#
# Usage: bash .ci/install-sglang-cpu.sh   (with the target venv's python first on PATH, or PYTHON=/path/to/python)
set -euo pipefail
PY=${PYTHON:-python}

"$PY" -c 'import torch' || { echo "install-sglang-cpu: torch must be installed first" >&2; exit 1; }

# Depend on torch (or are SGLang itself): no dependency resolution, so torch is never replaced.
"$PY" -m pip install --no-deps \
  sglang==0.5.17 torchvision==0.16.2 \
  xgrammar==0.2.8 apache-tvm-ffi==0.1.11 compressed-tensors==0.20.0

# Pure import-time dependencies, pinned; --no-deps keeps the set exact and the install fast.
"$PY" -m pip install --no-deps \
  transformers==5.12.1 tokenizers==0.22.2 huggingface-hub==1.33.0 \
  orjson==3.13.0 pybase64==1.5.1 starlette==1.10.0 anyio==4.16.0 \
  ipython==9.18.1 traitlets==5.16.1 \
  aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 attrs==26.1.0 frozenlist==1.8.0 \
  multidict==7.2.1 propcache==0.5.4 yarl==1.25.1 \
  msgspec==0.22.0 pyzmq==27.3.0 httpcore==1.0.9 h11==0.16.0 dill==0.4.1 \
  openai==3.54.0 sniffio==1.3.1 partial-json-parser==0.2.1.1.post7 loguru==0.7.3 \
  sentencepiece==0.2.3 einops==0.8.2

"$PY" - <<'PY'
import sglang.srt.server_args, sglang.srt.plugins.hook_registry
import sglang.srt.mem_cache.radix_cache, sglang.srt.mem_cache.allocator, sglang.srt.mem_cache.memory_pool
import torch
print(f"install-sglang-cpu: sglang {sglang.__version__} imports on CPU (torch {torch.__version__})")
PY
