#!/usr/bin/env bash
# Sampling on one CUDA GPU, in one call of at most BUDGET seconds (default 560):
#  1. the gpu tests of tests/test_sample.py and tests/test_kv_kernel.py (the fused decode kernel against
#     the torch step, compiled without a cache copy): the CUDA-graph decoding step against the eager step
#     and the full forward pass (bf16), no host sync in a step, the compiled + captured step;
#  2. `bench sample --device cuda`: the 152M audio preset at 65,536 tokens, batch 1/8/64, the
#     decoding step eager and as a CUDA graph, then compiled + captured (batch 1 first), 2,048
#     timed steps each, the sample's time extrapolated.
# Each step has a timeout (min of its cap and the time left); a step cut short keeps the rows it
# wrote. Writes $OUT/sample.jsonl, $OUT/sample.log, $OUT/sample.md; prints the table last.
#
#   bash scripts/gpu_sample_check.sh                 # OUT=DIR (default sample_out), BUDGET=SECONDS
set -u
OUT=${OUT:-sample_out}
LOG="$OUT/sample.log"
source "$(dirname "$0")/gpu_steps.sh"
rm -f "$OUT/sample.jsonl"

step 200 gpu_tests $PY -m pytest -q -p no:cacheprovider tests/test_sample.py tests/test_kv_kernel.py -m gpu
grep -E "passed|failed|error" "$LOG" | tail -n 3
BENCH="$PY -m sparse_transformer bench sample --device cuda --preset audio --window 2048 --attention torch,fused --out $OUT/sample.jsonl"
step 150 bench_eager_graphs $BENCH --batches 1,8,64 --modes eager,graphs
step 200 bench_compile_b1 $BENCH --batches 1 --modes compile
step 250 bench_compile_b8_b64 $BENCH --batches 8,64 --modes compile

$PY - "$OUT/sample.jsonl" <<'PYEOF' | tee "$OUT/sample.md"
import json, os, sys
from sparse_transformer.bench.sample import format_cuda_table
path = sys.argv[1]
rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
print(format_cuda_table(rows) if rows else "no bench rows (see sample.log)")
PYEOF
