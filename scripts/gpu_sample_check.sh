#!/usr/bin/env bash
# Sampling on one CUDA GPU: the gpu tests of tests/test_sample.py (the CUDA-graph decoding step
# against the eager step and the full forward pass, no host sync, the compiled step), then
# `bench sample` on CUDA: the 152M audio preset at 65,536 tokens, batch 1/8/64, the decoding step
# eager, captured in a CUDA graph, and compiled + captured (2,048 timed steps, rest extrapolated).
#
#   bash scripts/gpu_sample_check.sh            # OUT=DIR keeps sample.jsonl and sample.log there
#   BATCHES=1,8 MODES=graphs,compile bash scripts/gpu_sample_check.sh
set -u
OUT=${OUT:-sample_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
PY=${PYTHON:-python3}
LOG="$OUT/sample.log"
$PY -c "import torch, triton; print(torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton', triton.__version__)" | tee "$LOG"
echo "== gpu tests" | tee -a "$LOG"
timeout 600 $PY -m pytest -q -p no:cacheprovider tests/test_sample.py -m gpu 2>&1 | tail -n 25 | tee -a "$LOG"
echo "== bench sample (cuda)" | tee -a "$LOG"
rm -f "$OUT/sample.jsonl"
timeout 1500 $PY -m sparse_transformer bench sample --device cuda --preset audio --batches "${BATCHES:-1,8,64}" \
  --modes "${MODES:-eager,graphs,compile}" --window "${WINDOW:-2048}" --out "$OUT/sample.jsonl" 2>&1 \
  | grep -v '^{' | tee -a "$LOG"
echo "JSON lines: $OUT/sample.jsonl" | tee -a "$LOG"
