#!/usr/bin/env bash
# The checks that need a CUDA device, in one run: the CUDA tests, then the ij quadrature
# benchmark (and the precision benchmark) on the GPU. Results go to $OUT (default results/cuda).
# Usage: scripts/dev/cuda_checks.sh tests|minilm|mpnet MODEL_DIR [PAIRS]
#   tests   MODEL_DIR: tests/test_cuda.py on that model (minilm), and bf16 against fp32 (speed, drift)
#   minilm  MODEL_DIR: the quadrature table (60 pairs by default, reference check)
#   mpnet   MODEL_DIR: the mpnet goals: tolerance 1e-3 at layers 10 and 6 (PAIRS pairs), 0 (a third of them)
set -uo pipefail
cd "$(dirname "$0")/../.."
WHAT="$1"; MODEL="$2"; PAIRS="${3:-60}"
OUT="${OUT:-results/cuda}"; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 SIAMESE_TEST_MODEL="$MODEL"
BUDGET=(--memory-budget-mb 16384)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/device.txt"
case "$WHAT" in
  tests)
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda-tests.log"
    python3 -m scripts.bench.cuda_precision "$MODEL" 2>&1 | grep -v "^Loading" | tee "$OUT/cuda-precision.log" ;;
  minilm)
    python3 -m scripts.bench.quadrature --model-dir "$MODEL" --pairs "$PAIRS" --reference gauss:128 "${BUDGET[@]}" \
      --out "$OUT/quadrature-minilm.json" 2>&1 | grep -v "^Loading" | tee "$OUT/quadrature-minilm.log" ;;
  mpnet)
    for spec in "10 $PAIRS" "6 $PAIRS" "0 $((PAIRS / 3))"; do
      set -- $spec
      python3 -m scripts.bench.quadrature --model-dir "$MODEL" --layers "$1" --pairs "$2" --reference adaptive:1e-6 \
        --rules adaptive:1e-3 gauss:50 right:50 "${BUDGET[@]}" --out "$OUT/quadrature-mpnet-layer$1.json" 2>&1 \
        | grep -v "^Loading" | tee "$OUT/quadrature-mpnet-layer$1.log"
    done ;;
esac
