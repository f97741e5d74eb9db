#!/usr/bin/env bash
# Stop what scripts/serve.sh started: TorchServe, or with --engine kserve KServe's model server
# (its process group: the server and its explanation workers).
# Usage: scripts/stop.sh [--engine torchserve|kserve]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--engine" ] && [ "${2:-}" = kserve ]; then
  [ -f logs/kserve.pid ] || { echo "no logs/kserve.pid: KServe's model server was not started by scripts/serve.sh" >&2; exit 1; }
  PID=$(cat logs/kserve.pid)
  if kill -0 "$PID" 2>/dev/null; then
    kill -TERM -- "-$PID"
    for _ in $(seq 60); do kill -0 "$PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$PID" 2>/dev/null || true
  fi
  rm -f logs/kserve.pid
  echo "KServe's model server stopped"
  exit 0
fi
. .venv/bin/activate
torchserve --stop
