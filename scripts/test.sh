#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: unit tests and tests against a real TorchServe.
# Usage: scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Debian's prometheus for tests/test_prometheus.py (as root, as CI runs; its system service is not started).
[ "$(id -u)" != 0 ] || scripts/deploy/monitoring/install_prometheus.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest "$@"
