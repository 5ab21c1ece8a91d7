#!/usr/bin/env bash
# The test suite (sets up .venv first if it is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/harness ] || bash scripts/setup.sh
. scripts/env.sh
python -m pytest "$@"
