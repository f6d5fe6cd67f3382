#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, in two calls of at most BUDGET seconds each (a cold
# machine compiles Triton's and FlexAttention's kernels first: about a minute per length for Flex):
#
#   PART=attention PYTHONPATH=. BUDGET=570 bash scripts/gpu_bench.sh   # triton against dense SDPA
#       (cuDNN, flash) and the pure-PyTorch factorized backend at 4K-1M, then composed Flex at 1M, 64K
#   PART=rest PYTHONPATH=. BUDGET=570 bash scripts/gpu_bench.sh        # training steps sparse vs
#       dense, the launch profile (bench tiles --profile), the GPU tests, Flex at 16K (strided)
#
# Each step has a timeout (min of its cap and the time left of BUDGET); an interrupted step still
# writes the cases it finished. Steps that time the composed-Flex baseline re-time triton in the
# same process, so their rows carry "x flex". Writes $OUT/attention.jsonl, $OUT/train.jsonl,
# $OUT/launches.jsonl, $OUT/bench.log, $OUT/tables.md; prints the tables last.
set -u
OUT=${OUT:-bench_out}
LOG="$OUT/bench.log"
PART=${PART:-attention}
if [ "$PART" != attention ] && [ "$PART" != rest ]; then
  echo "gpu_bench.sh: PART must be attention or rest, got '$PART'" >&2
  exit 2
fi
source "$(dirname "$0")/gpu_steps.sh"

ATTN="$PY -m sparse_transformer bench attention --out $OUT/attention.jsonl"
TRAIN="$PY -m sparse_transformer bench train --out $OUT/train.jsonl"

case "$PART" in
  attention)
    step 60 attn_16k $ATTN --n 16K --backends sdpa_cudnn,sdpa_flash,triton,factorized
    step 60 attn_1m $ATTN --n 1M --backends sdpa_cudnn,triton
    step 45 attn_64k $ATTN --n 64K --backends sdpa_cudnn,sdpa_flash,triton
    step 50 attn_4k_256k $ATTN --n 4K,256K --backends sdpa_cudnn,triton
    step 120 flex_1m $ATTN --n 1M --backends triton,flex
    step 150 flex_64k $ATTN --n 64K --backends triton,flex
    ;;
  rest)
    step 150 train $TRAIN --case enwik8,strided64k,audio1m
    step 60 launches $PY -m sparse_transformer bench tiles --profile --out "$OUT/launches.jsonl"
    step 260 gpu_tests $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_model.py tests/test_triton.py
    grep -E "passed|failed|error" "$LOG" | tail -n 2
    step 150 flex_16k $ATTN --n 16K --patterns strided --backends triton,flex
    ;;
esac

$PY - "$OUT" <<'PYEOF' | tee "$OUT/tables.md"
import json, os, sys
from sparse_transformer.bench import attention, tiles, train
out = sys.argv[1]
def load(name):
    path = os.path.join(out, name)
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []
for name, fmt in (("attention.jsonl", attention.format_table), ("train.jsonl", train.format_table)):
    if load(name):
        print(fmt(load(name)))
        print()
if any(r.get("kind") == "launch" for r in load("launches.jsonl")):
    print(tiles.format_launches(load("launches.jsonl")))
PYEOF
