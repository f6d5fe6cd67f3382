# Sourced by the scripts/gpu_*.sh measurement scripts: one call of at most BUDGET seconds (default
# 560) made of steps, each under a timeout of min(its cap, the time left), logged to $LOG.
# Needs OUT and LOG set by the caller; sets PY, BUDGET, START and the PYTHONPATH of the checkout.
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-560}
START=$SECONDS

step() {  # step CAP NAME COMMAND...: run COMMAND with a timeout of min(CAP, time left)
  local cap=$1 name=$2 left t rc
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then echo "== $name: not run, budget spent" | tee -a "$LOG"; return; fi
  t=$((cap < left ? cap : left))
  echo "== $name (timeout ${t}s): $*" | tee -a "$LOG"
  timeout --signal=INT --kill-after=15 "$t" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "== $name: exit $rc, $((SECONDS - START)) s since start" | tee -a "$LOG"
}

$PY -c "import torch, triton; print(torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton', triton.__version__)" | tee -a "$LOG"
