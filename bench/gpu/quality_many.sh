#!/usr/bin/env bash
# Runs several quality drivers (bench/gpu/quality.py) at once on one GPU, each with its own server, port and
# share of GPU memory, then packs their outputs into one archive: Gemma 3 270M leaves an H100 mostly idle behind
# one server's scheduler, and a device call returns at most 8 files.
#
#   bash bench/gpu/quality_many.sh ARCHIVE NAME1 "DRIVER ARGS 1" [NAME2 "DRIVER ARGS 2" ...]
#
# Driver i serves on port 31400 + 10 i and writes /tmp/quality-many/NAMEi/ (records.jsonl.gz, quality.json,
# quality.md, the server log) and NAMEi.log; ARCHIVE (.tar.gz) holds them all. Give every driver its --seed,
# --deadline and --commit, and a KV pool of its own size: --mem-fraction 0.85 --server-extra=--max-total-tokens=N
# (repeat --server-extra for more flags). SGLang sizes its pool as what is free after loading minus a share of
# what was free before it (model_runner's profile_max_num_token), so servers starting together would each count
# the same free memory; a high fraction keeps that difference positive and --max-total-tokens caps what each takes
# (N x 18.4 KB on Gemma 3 270M; leave a few GB per server for CUDA graphs and activations). All drivers start at
# once, but one whose --resume-from records leave nothing to ask (bench.gpu.quality --left) is skipped. Exit
# status 1 when a driver failed.
set -uo pipefail
[ $# -ge 3 ] && [ $(($# % 2)) -eq 1 ] || { echo "usage: $0 ARCHIVE NAME ARGS [NAME ARGS ...]" >&2; exit 2; }
archive=$1
shift
work=/tmp/quality-many
rm -rf "$work" && mkdir -p "$work"
pids=() names=()
i=0
status=0
while [ $# -gt 0 ]; do
  name=$1 args=$2
  shift 2
  # a driver whose --resume-from records already answer its whole run starts no server
  # shellcheck disable=SC2086  # the driver's arguments are one string on purpose, split here
  left=$(python3 -m bench.gpu.quality $args --left 2>&1)
  rc=$?
  echo "== $name: ${left##*$'\n'}"
  [ "$rc" -eq 10 ] && continue
  [ "$rc" -eq 0 ] || { status=1; continue; }
  # shellcheck disable=SC2086
  python3 -m bench.gpu.quality $args --port $((31400 + 10 * i)) --out "$work/$name" >"$work/$name.log" 2>&1 &
  pids+=($!) names+=("$name")
  i=$((i + 1))
done
for k in "${!pids[@]}"; do
  wait "${pids[$k]}"
  rc=$?
  [ "$rc" -eq 0 ] || status=1
  echo "== ${names[$k]}: driver exit $rc"
  tail -n 12 "$work/${names[$k]}.log"
  [ -f "$work/${names[$k]}/records.jsonl" ] && gzip -f "$work/${names[$k]}/records.jsonl"
done
tar czf "$archive" -C "$work" .
exit $status
