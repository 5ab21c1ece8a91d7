#!/usr/bin/env bash
# The import contracts (`lint-imports`, pyproject.toml [tool.importlinter]), then the test suite; sets up
# .venv first if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
{ [ -x .venv/bin/harness ] && [ -x .venv/bin/lint-imports ]; } || bash scripts/setup.sh
. scripts/env.sh
lint-imports --no-cache --no-logo
python -m pytest "$@"
