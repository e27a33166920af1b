#!/usr/bin/env bash
# Side by side with NVIDIA kvpress (issue 20), one command: sets up bench/peers/kvpress/.venv (git-ignored) with the
# versions of bench/peers/kvpress/constraints.txt, runs the adapter's tests (they must pass), then the comparison,
# its tables and its plot. The project's own venv and constraints.txt are not touched.
#
#   bash bench/peers/kvpress/run.sh                         # CPU small check: 2K tokens, 25 prompts per cell
#   bash bench/peers/kvpress/run.sh --prompts 40 --context 4096
#   KVPRESS_TORCH='torch==2.13.0 --index-url <your CUDA wheel index>' \
#     bash bench/peers/kvpress/run.sh --device cuda --prompts 200 --context 8192   # GPU run (>= 200 per cell)
# On the project's offline GPU host (no pip index) use bench/peers/kvpress/gpu.sh instead: docs/kvpress.md,
# "On the GPU host".
#
# Needs the Gemma 3 270M checkpoint at ~/.cache/sgl-evict/gemma3-270m-hf (built once in the project's venv by
# sgl_evict.harness.load_gemma3_270m(); nothing is downloaded at run time). Extra arguments go to run.py
# (python -m bench.peers.kvpress.run --help). Output: bench/results/kvpress_<date>_<device>_gemma3-270m_<K>k.json
# and docs/img/kvpress_<date>_<device>_gemma3-270m_<K>k.png.
set -euo pipefail
cd "$(dirname "$0")/../../.."
HERE=bench/peers/kvpress
PY=$HERE/.venv/bin/python
[ -x "$PY" ] || python3 -m venv "$HERE/.venv"
# torch first, so that pip takes the CPU build where it serves one (as the project's README does)
# shellcheck disable=SC2086
"$PY" -m pip install -q -c "$HERE/constraints.txt" ${KVPRESS_TORCH:-torch==2.13.0}
"$PY" -m pip install -q -c "$HERE/constraints.txt" kvpress==0.5.5 matplotlib pytest
export HF_HUB_OFFLINE=1
# importlib mode: pytest must not put bench/peers on sys.path, where our kvpress/ folder would shadow the package
"$PY" -m pytest -q -p no:cacheprovider --import-mode=importlib "$HERE/test_adapter.py"
"$PY" -m bench.peers.kvpress.run --plot auto "$@"
