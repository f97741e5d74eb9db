#!/usr/bin/env bash
# Set up everything and serve a model:
#   venv, torch (CPU wheel first), the project, then either
#   TorchServe (the default): model_store/<source>.mar and <source>-explain.mar, TorchServe until
#   both pools are READY (docs/pools.md);
#   --engine kserve: KServe's model server in the background on 127.0.0.1:8085, until ready.
# Usage: scripts/serve.sh [--engine torchserve|kserve] [source]   (default: torchserve, minilm)
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE=torchserve
if [ "${1:-}" = "--engine" ]; then
  ENGINE="${2:?--engine takes torchserve or kserve}"
  shift 2
fi
SOURCE="${1:-minilm}"
case "$ENGINE" in torchserve|kserve) ;; *) echo "--engine: torchserve or kserve, not $ENGINE" >&2; exit 2 ;; esac
scripts/setup.sh
. .venv/bin/activate
if [ "$ENGINE" = kserve ]; then
  scripts/stop.sh --engine kserve >/dev/null 2>&1 || true
  mkdir -p logs
  read -r NAME MODEL_DIR < <(python -c "import sys; from handlers.tools.sources import model_dir, NAMED
path = model_dir(sys.argv[1]); print(sys.argv[1] if sys.argv[1] in NAMED else path.name, path)" "$SOURCE")
  setsid python -m handlers.serving.kserve.server --model_name "$NAME" --model_dir "$MODEL_DIR" \
    --http_host 127.0.0.1 --http_port 8085 >logs/kserve.out 2>&1 < /dev/null &
  echo $! > logs/kserve.pid
  python -m handlers.tools.local.ready --kserve http://127.0.0.1:8085 --pid "$(cat logs/kserve.pid)" \
    --model "$NAME" --timeout 300
  cat <<MSG
KServe's model server is serving ${NAME} on http://127.0.0.1:8085 (stop it with scripts/stop.sh --engine kserve). Try:
  curl -s -X POST http://127.0.0.1:8085/v1/models/${NAME}:predict -H 'Content-Type: application/json' \\
    -d '{"instances": [{"text_a": "A man is playing a guitar.", "text_b": "Someone plays music."}]}'
  curl -s -X POST http://127.0.0.1:8085/v1/models/${NAME}:explain -H 'Content-Type: application/json' \\
    -d '{"instances": [{"text_a": "A man is playing a guitar.", "text_b": "Someone plays music.", "method": "lrp"}]}'
MSG
  exit 0
fi
siamese-archive "$SOURCE" --pools   # always from the current code: <name>.mar and <name>-explain.mar
torchserve --stop >/dev/null 2>&1 || true
mkdir -p logs
LOG_LOCATION=logs METRICS_LOCATION=logs torchserve --start --ncs \
  --ts-config config.properties --model-store model_store \
  --models "${SOURCE}=${SOURCE}.mar" "${SOURCE}-explain=${SOURCE}-explain.mar" >logs/torchserve.out 2>&1
python -m handlers.tools.local.ready --model "$SOURCE" --timeout 300
python -m handlers.tools.local.ready --model "${SOURCE}-explain" --timeout 300
cat <<MSG
TorchServe is serving ${SOURCE} (predictions) and ${SOURCE}-explain (explanations) on
http://127.0.0.1:8080 (stop it with scripts/stop.sh). Try:
  curl -s -X POST http://127.0.0.1:8080/predictions/${SOURCE} -H 'Content-Type: application/json' \\
    -d '{"text_a": "A man is playing a guitar.", "text_b": "Someone plays music."}'
  curl -s -X POST http://127.0.0.1:8080/explanations/${SOURCE}-explain -H 'Content-Type: application/json' \\
    -d '{"text_a": "A man is playing a guitar.", "text_b": "Someone plays music.", "method": "ij"}'
MSG
