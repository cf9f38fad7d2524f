#!/usr/bin/env bash
# One-shot GPU check, for a session that is lent a CUDA machine (the H200: ~15 min of device time
# in all, 10 min per command). Run it as ONE command from the repository root:
#
#     bash scripts/gpu_check.sh            # everything lands in $OUT (default ./gpu_check_out)
#
# Steps (each under a timeout cut to what is left of TORCH_CRIT_GPU_BUDGET, default 540 s):
#   1. find a Python whose torch has CUDA ($PYTHON, python3, /opt/torch/.venv/bin/python3), else
#      make /tmp/gpu-venv and pip-install torch==$TORCH_CRIT_GPU_TORCH (default 2.14.1; needs a
#      reachable index or carried wheels); install pytest/ninja/numpy/tqdm only if missing;
#   2. build torch_crit._C in place with TORCH_CRIT_CUDA=1 for the GPU's own architecture;
#   3. check that the CUDA kernel is registered, then `pytest -m cuda` (every CUDA twin);
#   4. benchmarks/contraction_speed.py, ntk_speed.py and dntk_speed.py with --device cuda.
# Files in $OUT (at most 8, as the device tool returns): gpu_check.log (everything, incl.
# nvidia-smi), build.log, pytest_cuda.log, pytest_cuda.xml, steps.txt, and the benchmark JSONs.
# The exit status is 0 only if every step passed.
set -uo pipefail
set -x
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
BUDGET="${TORCH_CRIT_GPU_BUDGET:-540}"
START=$SECONDS
FAILED=0
: > "$OUT/steps.txt"

# step NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, time left), record its exit status.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START) - 5))
  if [ "$left" -lt 15 ]; then
    echo "SKIP $name (budget spent)" | tee -a "$OUT/steps.txt"
    FAILED=1
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s)"
  local t0=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  echo "$name rc=$rc ${limit}s-limit $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"
  [ "$rc" -eq 0 ] || FAILED=1
  return "$rc"
}

timeout 30 nvidia-smi || true

# 1. Python with a CUDA build of torch
PY=""
for cand in "${PYTHON:-}" python3 /opt/torch/.venv/bin/python3 python; do
  [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 || continue
  if "$cand" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
    PY=$(command -v "$cand")
    break
  fi
done
if [ -z "$PY" ]; then
  echo "no Python with a CUDA torch found; creating /tmp/gpu-venv"
  python3 -m venv /tmp/gpu-venv &&
    step pip_torch 300 /tmp/gpu-venv/bin/pip install -q "torch==${TORCH_CRIT_GPU_TORCH:-2.14.1}" numpy tqdm pytest setuptools wheel ninja &&
    PY=/tmp/gpu-venv/bin/python
  [ -n "$PY" ] || { echo "FATAL: no CUDA torch available" | tee -a "$OUT/steps.txt"; exit 2; }
fi
for mod in pytest ninja numpy tqdm setuptools; do
  "$PY" -c "import $mod" 2>/dev/null || timeout 120 "$PY" -m pip install -q "$mod" || echo "missing $mod"
done
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())' || FAILED=1

# 2. Build (in place; nothing is installed into site-packages)
# CUDA_HOME = the first candidate with both bin/nvcc and include/cuda_runtime.h (an nvcc on PATH
# may be a wrapper script outside the toolkit, e.g. /usr/local/bin/nvcc).
if [ -z "${CUDA_HOME:-}" ] || [ ! -f "$CUDA_HOME/include/cuda_runtime.h" ]; then
  nv=$(command -v nvcc 2>/dev/null || true)
  for c in ${nv:+"$(dirname "$(dirname "$(readlink -f "$nv")")")"} /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-12*; do
    if [ -x "$c/bin/nvcc" ] && [ -f "$c/include/cuda_runtime.h" ]; then CUDA_HOME=$c; break; fi
  done
fi
export CUDA_HOME
export PATH="${CUDA_HOME:+$CUDA_HOME/bin:}$PATH"
nvcc --version || echo "nvcc not found (CUDA_HOME=${CUDA_HOME:-unset})"
ARCH=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo "9.0")
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}"
export TORCH_CRIT_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
rm -f torch_crit/_C*.so
step build 300 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
tail -n 30 "$OUT/build.log"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" TORCH_CRIT_REQUIRE_EXT=1

# 3. The CUDA kernel is registered, then every CUDA test
step kernel_registered 60 "$PY" -c 'from torch_crit import _ops; import sys; print(sorted(_ops._KERNEL_KEYS)); sys.exit(0 if _ops.has_device_kernel("cuda") else 1)'
step pytest_cuda 200 "$PY" -m pytest -m cuda -q -ra -p no:cacheprovider --continue-on-collection-errors tests --junitxml="$OUT/pytest_cuda.xml" > "$OUT/pytest_cuda.log" 2>&1
tail -n 40 "$OUT/pytest_cuda.log"

# 4. Benchmarks on the GPU
step contraction_speed 150 "$PY" benchmarks/contraction_speed.py --device cuda
cp benchmarks/results/contraction_speed_cuda.json "$OUT/" 2>/dev/null || true
if [ -f benchmarks/ntk_speed.py ]; then
  step ntk_speed 200 "$PY" benchmarks/ntk_speed.py --device cuda
  find benchmarks/results -maxdepth 1 -name 'ntk_speed*.json' -newer "$OUT/steps.txt" -exec cp {} "$OUT/" \;
else
  echo "SKIP ntk_speed (benchmarks/ntk_speed.py not in this tree)" | tee -a "$OUT/steps.txt"
fi
step dntk_speed 120 "$PY" benchmarks/dntk_speed.py --device cuda --n 16,32,64,128 --timeout 30
cp benchmarks/results/dntk_speed_cuda.json "$OUT/" 2>/dev/null || true

echo "=== total $((SECONDS - START)) s, failed=$FAILED"
cat "$OUT/steps.txt"
exit "$FAILED"
