#!/usr/bin/env bash
# Runs several quality drivers (bench/gpu/quality.py) at once on one GPU, each with its own server, port and
# share of GPU memory, then packs their outputs into one archive: Gemma 3 270M leaves an H100 mostly idle behind
# one server's scheduler, and a device call returns at most 8 files.
#
#   bash bench/gpu/quality_many.sh ARCHIVE NAME1 "DRIVER ARGS 1" [NAME2 "DRIVER ARGS 2" ...]
#
# Driver i serves on port 31400 + 10 i and writes /tmp/quality-many/NAMEi/ (records.jsonl.gz, quality.json,
# quality.md, the server log) and NAMEi.log; ARCHIVE (.tar.gz) holds them all. Give every driver its
# --mem-fraction (the shares must add up to less than 0.9), --seed, --deadline and --commit. A driver starts once
# the one before it has allocated its KV pool (at most 150 s later): SGLang sizes its pool from the memory free
# when it starts, and two servers measuring at once would count the same free memory. Exit status 1 when a
# driver failed.
set -uo pipefail
[ $# -ge 3 ] && [ $(($# % 2)) -eq 1 ] || { echo "usage: $0 ARCHIVE NAME ARGS [NAME ARGS ...]" >&2; exit 2; }
archive=$1
shift
work=/tmp/quality-many
rm -rf "$work" && mkdir -p "$work"
pids=() names=()
i=0
while [ $# -gt 0 ]; do
  name=$1 args=$2
  shift 2
  # shellcheck disable=SC2086  # the driver's arguments are one string on purpose, split here
  python3 -m bench.gpu.quality $args --port $((31400 + 10 * i)) --out "$work/$name" >"$work/$name.log" 2>&1 &
  pids+=($!) names+=("$name")
  i=$((i + 1))
  if [ $# -gt 0 ]; then
    for _ in $(seq 150); do
      grep -qs "KV Cache is allocated" "$work/$name"/server-*.log && break
      kill -0 "${pids[-1]}" 2>/dev/null || break
      sleep 1
    done
  fi
done
status=0
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
