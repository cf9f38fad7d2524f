#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv:
#   * torch==2.13.0 pinned (this takes the local CPU wheel; an unpinned torch would download a CUDA build),
#   * torch_crit installed editable with the given extras,
#   * the C++ operator library torch_crit._C compiled ahead of time (not on first import).
# Idempotent: re-running only rebuilds when the build inputs changed.
# One environment serves the demo and the tests (extras [test] include [demo]).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="test"
PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_CRIT_TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=".venv/.torch_crit-setup"
inputs=$(cat pyproject.toml setup.py $(find csrc -type f | sort) | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ] && "$VPY" -c "import torch, torch_crit._C" 2>/dev/null; then
  echo "[setup] .venv is up to date"
  exit 0
fi
echo "[setup] installing build tools and $TORCH_SPEC"
"$VPY" -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel ninja
"$VPY" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
echo "[setup] building torch_crit (C++ extension) with extras [$EXTRAS]"
MAX_JOBS="${MAX_JOBS:-2}" "$VPY" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[$EXTRAS]"
# torchvision's model definitions for the real-architecture tests; --no-deps keeps our torch (its own pin
# would replace it). Its compiled ops need not load: tests/_torchvision.py imports the model classes only.
"$VPY" -m pip install -q --disable-pip-version-check --no-deps "torchvision==0.28.*"
"$VPY" -c "import torch, torch_crit._C; print('[setup] torch', torch.__version__, '- torch_crit._C built')"
echo "$inputs" > "$stamp"
