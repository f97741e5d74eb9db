#!/usr/bin/env bash
# Set up everything and serve a model:
#   venv, torch (CPU wheel first), the project, then either
#   TorchServe (the default): model_store/<source>.mar and <source>-explain.mar, TorchServe until
#   both pools are READY (docs/pools.md);
#   --engine kserve: KServe's model server in the background on 127.0.0.1:8085, until ready;
#   with --runtime onnx its predictions run in onnxruntime (model_store/kserve-modelserver/<name>: model, graph, settings).
# Usage: scripts/serve.sh [--engine torchserve|kserve] [--runtime torch|onnx] [source]   (default: torchserve, torch, minilm)
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE=torchserve
RUNTIME=torch
while [ "${1:-}" = "--engine" ] || [ "${1:-}" = "--runtime" ]; do
  case "$1" in
    --engine) ENGINE="${2:?--engine takes torchserve or kserve}" ;;
    --runtime) RUNTIME="${2:?--runtime takes torch or onnx}" ;;
  esac
  shift 2
done
SOURCE="${1:-minilm}"
case "$ENGINE" in torchserve|kserve) ;; *) echo "--engine: torchserve or kserve, not $ENGINE" >&2; exit 2 ;; esac
case "$RUNTIME" in torch|onnx) ;; *) echo "--runtime: torch or onnx, not $RUNTIME" >&2; exit 2 ;; esac
if [ "$ENGINE" = torchserve ] && [ "$RUNTIME" = onnx ]; then
  echo "--runtime onnx: with --engine kserve (TorchServe: siamese-archive --runtime onnx, docs/performance.md)" >&2; exit 2
fi
scripts/setup.sh
. .venv/bin/activate
if [ "$ENGINE" = kserve ]; then
  scripts/stop.sh --engine kserve >/dev/null 2>&1 || true
  mkdir -p logs
  read -r NAME MODEL_DIR < <(python -c "import sys; from handlers.tools.sources import model_dir, NAMED
path = model_dir(sys.argv[1]); print(sys.argv[1] if sys.argv[1] in NAMED else path.name, path)" "$SOURCE")
  if [ "$RUNTIME" = onnx ]; then  # the storage layout, made every time from the current model as archives are:
    # model/, the exported graph, and the engine settings measured fastest with it (docs/performance.md)
    MODEL_DIR="$PWD/model_store/kserve-modelserver/${NAME}"
    python -c "import sys; from pathlib import Path; from handlers.tools.deploy.modelserver import layout
layout(sys.argv[1], Path(sys.argv[2]), ['--runtime', 'onnx'])" "$SOURCE" "$MODEL_DIR"
  fi
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
