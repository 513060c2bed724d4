#!/usr/bin/env bash
# Stop the backends that scripts/backends/start.sh started.
# Usage: scripts/backends/stop.sh RUN_DIR   (start.sh's CIRRON_BACKENDS_RUN_DIR)
# Only the pids recorded in RUN_DIR/*.pid are signalled (TERM, then KILL after
# 10 s), and only while they still run the command that start.sh started.
set -euo pipefail
RUN_DIR=${1:-${CIRRON_BACKENDS_RUN_DIR:-}}
[[ -n $RUN_DIR && -d $RUN_DIR ]] || { echo "usage: $0 RUN_DIR" >&2; exit 2; }
shopt -s nullglob
for f in "$RUN_DIR"/*.pid; do
  name=$(basename "$f" .pid)
  pid=$(cat "$f")
  if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- '--config[.=]'; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    echo "[backends/stop] stopped $name (pid $pid)" >&2
  fi
  rm -f "$f"
done
