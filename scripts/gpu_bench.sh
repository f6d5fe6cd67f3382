#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md in one call: attention backends x patterns x n
# (triton, dense SDPA cuDNN/flash, factorized, composed Flex), the flex backend's GPU numerics, then
# (time left) full training steps sparse vs dense. Each step has a timeout (min of its cap and the time left of
# BUDGET seconds); an interrupted step still writes the cases it finished. Steps that time the
# composed-Flex baseline re-time triton in the same process, so their rows carry "x flex".
#
#   PYTHONPATH=. BUDGET=560 bash scripts/gpu_bench.sh
#
# Writes $OUT/attention.jsonl, $OUT/train.jsonl, $OUT/bench.log, $OUT/tables.md; prints the tables last.
set -u
OUT=${OUT:-bench_out}
LOG="$OUT/bench.log"
source "$(dirname "$0")/gpu_steps.sh"

ATTN="$PY -m sparse_transformer bench attention --out $OUT/attention.jsonl"
TRAIN="$PY -m sparse_transformer bench train --out $OUT/train.jsonl"

# The targets' lengths first (16K, 1M), each with its Flex baseline; compiling Flex's kernels on a
# cold machine takes about a minute per length, hence the larger caps of the flex steps.
step 60 attn_16k $ATTN --n 16K --backends sdpa_cudnn,sdpa_flash,triton,factorized
step 150 flex_16k $ATTN --n 16K --backends triton,flex
step 60 attn_1m $ATTN --n 1M --backends sdpa_cudnn,triton
step 45 attn_64k $ATTN --n 64K --backends sdpa_cudnn,sdpa_flash,triton
step 50 attn_4k_256k $ATTN --n 4K,256K --backends sdpa_cudnn,triton
step 100 flex_1m $ATTN --n 1M --backends triton,flex
step 60 test_flex $PY -m pytest -q -x -p no:cacheprovider tests/test_flex.py -m gpu -k "bf16 and (strided or fixed)"
step 100 flex_64k $ATTN --n 64K --backends triton,flex
step 80 train_enwik8 $TRAIN --case enwik8,strided64k --steps 3 --warmup 2
step 45 train_audio $TRAIN --case audio1m --steps 2 --warmup 1

$PY - "$OUT" <<'PYEOF' | tee "$OUT/tables.md"
import json, os, sys
from sparse_transformer.bench import attention, train
out = sys.argv[1]
def load(name):
    path = os.path.join(out, name)
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []
print(attention.format_table(load("attention.jsonl")))
print()
print(train.format_table(load("train.jsonl")))
PYEOF
