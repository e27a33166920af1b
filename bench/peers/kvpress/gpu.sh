#!/usr/bin/env bash
# The kvpress comparison (issue 20) on the offline GPU host, in one device call: N processes share the GPUs, each
# runs one shard of the prompts (run.py --shard K/N, --device cuda); all stop at the deadline (each rewrites its JSON
# after every prompt, so a stop loses at most the prompts in progress); then merge.py joins what is there.
#
#   bash bench/peers/kvpress/gpu.sh CONTEXT PROMPTS [run.py args ...]      (from anywhere; runs at the repo root)
#
# Before it: bundle kvpress and gemma1..gemma6 installed into $KVSITE with bench/gpu/install.sh (docs/kvpress.md,
# "On the GPU host", gives the calls). Environment, with defaults:
#   KVSITE=/tmp/kvsite                   bundle kvpress's folder (with the Gemma parts and tokenizer); put in front of
#                                        the host's site-packages (never /tmp/site: SGLang's transformers is there)
#   KVPRESS_MODEL=/tmp/gemma3-270m-hf    the checkpoint; converted from the Gemma parts here when missing (~90 s)
#   KVPRESS_PER_GPU=8                    processes per GPU; KVPRESS_SHARDS (default GPUs x KVPRESS_PER_GPU) sets N
#                                        itself: keep N the same over the calls that resume one run
#   KVPRESS_DEADLINE=530                 seconds after this script's start when the shards are stopped
#   KVPRESS_RESUME=FOLDER                an earlier call's CONTEXT_shards.tgz (or its shard JSONs), carried back
#                                        in: unpacked or copied to OUT and continued
#   KVPRESS_DEVICE=cuda                 cpu: the same on the CPU, one process group (a local check of this script)
#   OUT (the device tool sets it)        kvpress_cuda_CONTEXT_shards.tgz (the shard JSONs and logs), the merged
#                                        kvpress_<date>_cuda_gemma3-270m_<K>k.json.gz and its tables, convert.log
#                                        (default /tmp/kvpress-out)
set -euo pipefail
CONTEXT=${1:?usage: gpu.sh CONTEXT PROMPTS [run.py args ...]}
PROMPTS=${2:?usage: gpu.sh CONTEXT PROMPTS [run.py args ...]}
shift 2
start=$(date +%s)
cd "$(dirname "$0")/../../.."
SITE=${KVSITE:-/tmp/kvsite}
MODEL=${KVPRESS_MODEL:-/tmp/gemma3-270m-hf}
OUTDIR=${OUT:-/tmp/kvpress-out}
mkdir -p "$OUTDIR"
export PYTHONPATH=$SITE:. HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 SGL_EVICT_SITE=$SITE
# what is imported from where (the bundle's kvpress and transformers, the host's torch), and the versions of the
# packages the bundle does not carry (the host's; pandas is the bundle's)
python3 - <<'EOF' >&2
import importlib.metadata as md
import kvpress, torch, transformers
print("[gpu.sh] kvpress", md.version("kvpress"), kvpress.__file__, "| transformers", transformers.__version__,
      transformers.__file__, "| torch", torch.__version__, "| GPUs", torch.cuda.device_count())
print("[gpu.sh] first on the path:", ", ".join(f"{n} {md.version(n)}" for n in
      ("numpy", "pyarrow", "accelerate", "huggingface_hub", "safetensors", "xxhash", "matplotlib", "pandas")))
EOF
if [ ! -f "$MODEL/config.json" ]; then
  python3 -c "from pathlib import Path; from bench.gpu.smoke import SITE, convert_gemma as c; \
c(SITE / 'gemma-parts', Path('$MODEL'))" > "$OUTDIR/convert.log" 2>&1 \
    || { echo "gpu.sh: the conversion failed:" >&2; tail -5 "$OUTDIR/convert.log" >&2; exit 4; }
  echo "[gpu.sh] converted $MODEL in $(( $(date +%s) - start )) s" >&2
fi
DEVICE=${KVPRESS_DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then G=1; else G=$(python3 -c 'import torch; print(torch.cuda.device_count())'); fi
[ "$G" -ge 1 ] || { echo "gpu.sh: no CUDA GPU" >&2; exit 2; }
N=${KVPRESS_SHARDS:-$(( G * ${KVPRESS_PER_GPU:-8} ))}
NAME="kvpress_${DEVICE}_${CONTEXT}"
if [ -n "${KVPRESS_RESUME:-}" ]; then
  # an earlier call's shards: its archive as it came back, or the shard JSONs themselves
  packed="$KVPRESS_RESUME/${NAME}_shards.tgz"
  [ ! -f "$packed" ] || tar xzf "$packed" -C "$OUTDIR" --wildcards "${NAME}_shard*-of-$N.json" \
    || { echo "gpu.sh: $packed holds no shard of $N (N must stay the same over one run)" >&2; exit 2; }
  n=0
  for f in "$KVPRESS_RESUME/${NAME}"_shard*-of-"$N".json; do [ -f "$f" ] && cp "$f" "$OUTDIR/"; done
  for f in "$OUTDIR/${NAME}"_shard*-of-"$N".json; do [ -f "$f" ] && n=$((n + 1)); done
  echo "[gpu.sh] resuming $n shard files of $N from $KVPRESS_RESUME" >&2
fi
left=$(( ${KVPRESS_DEADLINE:-530} - ($(date +%s) - start) ))
[ "$left" -gt 30 ] || { echo "gpu.sh: no time left for the shards ($left s)" >&2; exit 3; }
echo "[gpu.sh] $N shards on $G GPU(s), context $CONTEXT, $PROMPTS prompts, stop in $left s" >&2
pids=()
for k in $(seq 0 $((N - 1))); do
  f="$OUTDIR/${NAME}_shard$k-of-$N"
  CUDA_VISIBLE_DEVICES=$((k % G)) OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1 \
    timeout -k 20 -s INT "$left" python3 -m bench.peers.kvpress.run --device "$DEVICE" --model "$MODEL" \
    --context "$CONTEXT" --prompts "$PROMPTS" --shard "$k/$N" --resume --out "$f.json" "$@" > "$f.log" 2>&1 &
  pids+=($!)
done
stopped=0 failed=0
for k in "${!pids[@]}"; do
  rc=0
  wait "${pids[$k]}" || rc=$?
  case $rc in
    0) ;;
    124|130|137) stopped=$((stopped + 1)) ;;
    *) failed=$((failed + 1))
       echo "[gpu.sh] shard $k failed (exit $rc):" >&2
       tail -5 "$OUTDIR/${NAME}_shard$k-of-$N.log" >&2 ;;
  esac
done
echo "[gpu.sh] shards: $((N - stopped - failed)) finished, $stopped stopped at the deadline, $failed failed;" \
  "$(( $(date +%s) - start )) s" >&2
merged="$OUTDIR/kvpress_$(date -u +%F)_${DEVICE}_gemma3-270m_$((CONTEXT / 1024))k.json.gz"
shards=("$OUTDIR/${NAME}"_shard*-of-"$N".json)
if [ -f "${shards[0]}" ]; then
  python3 -m bench.peers.kvpress.merge --out "$merged" "${shards[@]}" > "$OUTDIR/${NAME}_tables.md" \
    || { echo "[gpu.sh] merge failed" >&2; failed=$((failed + 1)); }
  head -c 3000 "$OUTDIR/${NAME}_tables.md"
  # a device call brings back at most 8 files: the shards' JSONs and logs travel as one archive
  (cd "$OUTDIR" && tar czf "${NAME}_shards.tgz" --remove-files "${NAME}"_shard*-of-"$N".*)
fi
[ "$failed" = 0 ]
