#!/usr/bin/env bash
# Set up everything and serve the default archive:
#   venv, torch (CPU wheel first), the project, model_store/minilm.mar and minilm-explain.mar,
#   TorchServe until both pools are READY (README: "Isolating explanations").
# Usage: scripts/serve.sh [archive-source]   (default: minilm)
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE="${1:-minilm}"
scripts/setup.sh
. .venv/bin/activate
siamese-archive "$SOURCE" --pools   # always from the current code: <name>.mar and <name>-explain.mar
torchserve --stop >/dev/null 2>&1 || true
mkdir -p logs
LOG_LOCATION=logs METRICS_LOCATION=logs torchserve --start --ncs \
  --ts-config config.properties --model-store model_store \
  --models "${SOURCE}=${SOURCE}.mar" "${SOURCE}-explain=${SOURCE}-explain.mar" >logs/torchserve.out 2>&1
python -m scripts.dev.wait_ready --model "$SOURCE" --timeout 300
python -m scripts.dev.wait_ready --model "${SOURCE}-explain" --timeout 300
cat <<MSG
TorchServe is serving ${SOURCE} (predictions) and ${SOURCE}-explain (explanations) on
http://127.0.0.1:8080 (stop it with scripts/stop.sh). Try:
  curl -s -X POST http://127.0.0.1:8080/predictions/${SOURCE} -H 'Content-Type: application/json' \\
    -d '{"text_a": "A man is playing a guitar.", "text_b": "Someone plays music."}'
  curl -s -X POST http://127.0.0.1:8080/explanations/${SOURCE}-explain -H 'Content-Type: application/json' \\
    -d '{"text_a": "A man is playing a guitar.", "text_b": "Someone plays music.", "method": "ij"}'
MSG
