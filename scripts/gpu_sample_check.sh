#!/usr/bin/env bash
# Sampling on one CUDA GPU, in one call of at most BUDGET seconds (default 560):
#  1. the gpu tests of tests/test_sample.py and tests/test_kv_kernel.py (the fused decode kernel against
#     the torch step, compiled without a cache copy): the CUDA-graph decoding step against the eager step
#     and the full forward pass (bf16), no host sync in a step, the compiled + captured step;
#  2. `bench sample --device cuda`: the 152M audio preset at 65,536 tokens, torch and fused decode
#     attention: compiled + captured at batch 1 (2,048 timed steps), the plain CUDA graph at batch
#     1/8/64 (512 steps), eager at batch 1 (128 steps); the sample's time extrapolated.
# Each step has a timeout (min of its cap and the time left); a step cut short keeps the rows it
# wrote. Writes $OUT/sample.jsonl, $OUT/sample.log, $OUT/sample.md; prints the table last.
#
#   bash scripts/gpu_sample_check.sh                 # OUT=DIR (default sample_out), BUDGET=SECONDS
set -u
OUT=${OUT:-sample_out}
LOG="$OUT/sample.log"
source "$(dirname "$0")/gpu_steps.sh"
rm -f "$OUT/sample.jsonl"

step 150 gpu_tests $PY -m pytest -q -p no:cacheprovider tests/test_sample.py tests/test_kv_kernel.py -m gpu
grep -E "passed|failed|error" "$LOG" | tail -n 3
BENCH="$PY -m sparse_transformer bench sample --device cuda --preset audio --attention torch,fused --out $OUT/sample.jsonl"
# The target first (compiled + captured, batch 1; compilation costs 70-100 s per attention path),
# then the plain CUDA graph at batch 1/8/64 and the eager step (short windows: they are slow).
step 270 bench_compile_b1 $BENCH --window 2048 --batches 1 --modes compile
step 90 bench_graphs $BENCH --window 512 --batches 1,8,64 --modes graphs
step 60 bench_eager_b1 $BENCH --window 128 --batches 1 --modes eager

$PY - "$OUT/sample.jsonl" <<'PYEOF' | tee "$OUT/sample.md"
import json, os, sys
from sparse_transformer.bench.sample import format_cuda_table
path = sys.argv[1]
rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
print(format_cuda_table(rows) if rows else "no bench rows (see sample.log)")
PYEOF
