#!/usr/bin/env bash
# A GPU-host job longer than one device call (10 minutes): started detached, then waited on over later calls.
#
#   bash bench/gpu/detached.sh start NAME COMMAND...   starts COMMAND in a session of its own (setsid), so it
#                                                    outlives this call; its output goes to /tmp/detached/NAME/log
#   bash bench/gpu/detached.sh wait NAME SECONDS     waits up to SECONDS, printing the log's new lines; then copies
#                                                    what the job wrote under /tmp/detached/NAME/out to $OUT (and
#                                                    the log), and says whether it still runs (exit 0) or ended
#                                                    (exit: the job's status)
#
# The job finds its output folder in $OUT and $DETACHED_OUT (/tmp/detached/NAME/out). The device machine keeps
# /tmp, and the job, only while it stays warm: call `wait` again within its idle time (about 30 s), back to back.
# Used for the soak (issue 24: 20 minutes of serving; docs/benchmarks.md).
set -euo pipefail
ROOT=${DETACHED_ROOT:-/tmp/detached}
cmd=${1:?usage: detached.sh start NAME COMMAND... | wait NAME SECONDS}
name=${2:?usage: detached.sh start NAME COMMAND... | wait NAME SECONDS}
dir="$ROOT/$name"
case "$cmd" in
  start)
    shift 2
    [ "$#" -gt 0 ] || { echo "detached.sh start: no command given" >&2; exit 2; }
    if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      echo "detached.sh: $name already runs (pid $(cat "$dir/pid"))" >&2
      exit 2
    fi
    rm -rf "$dir"
    mkdir -p "$dir/out"
    # the exit status lands in a file: the job is no child of a later call's shell
    OUT="$dir/out" DETACHED_OUT="$dir/out" setsid bash -c '"$@" > "$0/log" 2>&1; echo $? > "$0/status"' "$dir" "$@" \
      < /dev/null > /dev/null 2>&1 &
    echo $! > "$dir/pid"
    echo "detached.sh: $name started (pid $!), output in $dir"
    ;;
  wait)
    seconds=${3:?usage: detached.sh wait NAME SECONDS}
    [ -d "$dir" ] || { echo "detached.sh: no job $name here (the machine was given back, or never started it)" >&2
                       exit 3; }
    end=$(( $(date +%s) + seconds ))
    shown=$(cat "$dir/shown" 2>/dev/null || echo 0)
    while :; do
      lines=$(wc -l < "$dir/log" 2>/dev/null || echo 0)
      if [ "$lines" -gt "$shown" ]; then
        sed -n "$((shown + 1)),${lines}p" "$dir/log"
        shown=$lines
        echo "$shown" > "$dir/shown"
      fi
      [ -f "$dir/status" ] && break
      [ "$(date +%s)" -lt "$end" ] || break
      sleep 5
    done
    if [ -n "${OUT:-}" ]; then
      cp -r "$dir/out/." "$OUT/" 2>/dev/null || true
      cp "$dir/log" "$OUT/$name.log" 2>/dev/null || true
    fi
    if [ -f "$dir/status" ]; then
      status=$(cat "$dir/status")
      echo "detached.sh: $name ended with status $status"
      exit "$status"
    fi
    echo "detached.sh: $name still runs"
    ;;
  *)
    echo "usage: detached.sh start NAME COMMAND... | wait NAME SECONDS" >&2
    exit 2
    ;;
esac
