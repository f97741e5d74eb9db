#!/usr/bin/env bash
# Run Prometheus in the foreground, scraping the TorchServe of scripts/serve.sh (127.0.0.1:8082)
# every 15 s with scripts/deploy/monitoring/prometheus.yml; data in logs/prometheus.
# Usage: scripts/deploy/monitoring/run_prometheus.sh [port]   (default 9090)
set -euo pipefail
cd "$(dirname "$0")/../.."
PORT="${1:-9090}"
command -v prometheus >/dev/null || {
  echo "prometheus is not installed: sudo scripts/deploy/monitoring/install_prometheus.sh (Debian/Ubuntu)" >&2
  exit 1
}
mkdir -p logs/prometheus
exec prometheus --config.file=scripts/deploy/monitoring/prometheus.yml --storage.tsdb.path=logs/prometheus \
  --web.listen-address="127.0.0.1:${PORT}"
