#!/usr/bin/env bash
# Set up .venv (see scripts/setup.sh) and run the main job: `torch-crit demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/torch-crit demo "$@"
