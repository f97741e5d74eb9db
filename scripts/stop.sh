#!/usr/bin/env bash
# Stop the TorchServe started by scripts/serve.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
torchserve --stop
