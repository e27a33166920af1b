#!/usr/bin/env bash
# Host side of the offline path: installs one bundle made by wheelhouse.sh into a target folder that later calls reuse.
#
#   bash bench/gpu/install.sh BUNDLE_DIR [TARGET]     (TARGET defaults to /tmp/site)
#
# Bundles a, b, c are wheel folders (c also holds the trimmed sgl_kernel); gemmaN folders hold GGUF parts, copied to
# TARGET/gemma-parts/ in any order and joined by name (bench/gpu/smoke.py checks the sha256); fa3-N folders hold
# parts of FlashAttention-3's flash_ops.abi3.so (xz), joined into TARGET/sgl_kernel once all are there, sha256
# checked (needs bundle c's sgl_kernel first). A bundle holding tokenizer.json.xz (gemma6tok, kvpress) also unpacks
# it with tokenizer_config.json into TARGET/gemma-tok/, where smoke.convert_gemma reads them (SGL_EVICT_SITE=TARGET).
# Bundle kvpress goes into a folder of its own (install.sh .gpu-bundles/kvpress /tmp/kvsite; docs/kvpress.md). Each
# bundle leaves a marker, so a repeated call is a no-op. The device machine keeps /tmp only while it stays warm
# between calls: `install.sh --check [TARGET]` says which bundles are in place.
set -euo pipefail
if [ "${1:-}" = "--check" ]; then
  TARGET=${2:-/tmp/site}
  for b in a b c; do
    if [ -e "$TARGET/.installed-$b" ]; then echo "bundle $b: installed"; else echo "bundle $b: MISSING"; fi
  done
  ls "$TARGET"/.installed-gemma* >/dev/null 2>&1 && echo "gemma parts: $(ls "$TARGET"/.installed-gemma* | wc -l)"
  [ -e "$TARGET/.installed-kvpress" ] && echo "bundle kvpress: installed"
  exit 0
fi
BUNDLE=${1:?usage: install.sh BUNDLE_DIR [TARGET] | --check [TARGET]}
TARGET=${2:-/tmp/site}
name=$(basename "$BUNDLE")
mkdir -p "$TARGET"
if [ -e "$TARGET/.installed-$name" ]; then
  echo "install.sh: bundle $name already installed in $TARGET"
  exit 0
fi
case "$name" in
  b|c) [ -e "$TARGET/.installed-a" ] || { echo "install.sh: bundle a is missing from $TARGET (machine went cold?): install a, b, c in order" >&2; exit 3; } ;;
esac
start=$(date +%s)
if [[ "$name" == fa3-* ]]; then
  [ -e "$TARGET/.installed-c" ] || { echo "install.sh: bundle c (sgl_kernel) is missing from $TARGET: install a, b, c first" >&2; exit 3; }
  mkdir -p "$TARGET/fa3-parts"
  cp "$BUNDLE"/* "$TARGET/fa3-parts/"
  parts="$TARGET/fa3-parts"
  if [ -f "$parts/parts" ] && [ "$(ls "$parts"/flash_ops.abi3.so.xz.part* | wc -l)" -eq "$(cat "$parts/parts")" ]; then
    cat "$parts"/flash_ops.abi3.so.xz.part* | xz -dc > "$TARGET/sgl_kernel/flash_ops.abi3.so"
    [ "$(sha256sum "$TARGET/sgl_kernel/flash_ops.abi3.so" | cut -d' ' -f1)" = "$(cat "$parts/flash_ops.sha256")" ] \
      || { echo "install.sh: flash_ops.abi3.so does not match its sha256" >&2; rm -f "$TARGET/sgl_kernel/flash_ops.abi3.so"; exit 6; }
    rm -rf "$parts"
    echo "install.sh: flash_ops.abi3.so joined into $TARGET/sgl_kernel (fa3 backend)"
  fi
elif [ "$name" = gemma-tok ]; then
  mkdir -p "$TARGET/gemma-tok"
  cp "$BUNDLE"/tokenizer*.json "$TARGET/gemma-tok/"
elif [[ "$name" == gemma* ]]; then
  mkdir -p "$TARGET/gemma-parts"
  cp "$BUNDLE"/gemma.gguf.* "$TARGET/gemma-parts/"
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TARGET" "$BUNDLE"/*.whl
  if [ -f "$BUNDLE/sgl_kernel_trim.tar.xz" ]; then tar xJf "$BUNDLE/sgl_kernel_trim.tar.xz" -C "$TARGET"; fi
fi
if [ -f "$BUNDLE/tokenizer.json.xz" ]; then
  mkdir -p "$TARGET/gemma-tok"
  xz -dc "$BUNDLE/tokenizer.json.xz" > "$TARGET/gemma-tok/tokenizer.json"
  cp "$BUNDLE/tokenizer_config.json" "$TARGET/gemma-tok/"
fi
touch "$TARGET/.installed-$name"
echo "install.sh: bundle $name installed in $TARGET in $(( $(date +%s) - start )) s"
