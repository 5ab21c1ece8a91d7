#!/usr/bin/env bash
# The import contracts (`lint-imports`, pyproject.toml [tool.importlinter]), then the test suite; sets up
# .venv first if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
{ [ -x .venv/bin/harness ] && [ -x .venv/bin/lint-imports ]; } || bash scripts/setup.sh
. scripts/env.sh
lint-imports --no-cache --no-logo
# two workers (the machines have 2 cores; every test runs one torch thread), tests of one file on one worker
python -m pytest -n "${HARNESS_TEST_WORKERS:-2}" --dist loadfile "$@"
