#!/usr/bin/env bash
# Compile every CUDA kernel file in csrc/ with plain nvcc for sm_80 and sm_90 (no GPU and no
# CUDA build of torch needed: .cu files include CUDA headers only, the ATen glue lives in .cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
if ! command -v "$NVCC" >/dev/null; then
  echo "[cuda] nvcc not found; set NVCC or put it on PATH" >&2
  exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
n=0
while IFS= read -r f; do
  echo "[cuda] nvcc $f (sm_80, sm_90)"
  "$NVCC" -std=c++17 -O3 -Icsrc -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -c "$f" -o "$out/$(basename "$f").o"
  n=$((n + 1))
done < <(find csrc -name '*.cu' | sort)
echo "[cuda] compiled $n .cu file(s)"
