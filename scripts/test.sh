#!/usr/bin/env bash
# Set up .venv (see scripts/setup.sh) and run the whole test suite.
# The compiled extension is required: TORCH_CRIT_REQUIRE_EXT=1 makes a missing build an error.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCH_CRIT_REQUIRE_EXT=1
exec .venv/bin/python -m pytest -q -ra "$@"
