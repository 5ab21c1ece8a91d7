#!/usr/bin/env bash
# Create .venv and install harness with its dependencies from the package registries.
# torch is pinned to the CPU build (2.13.0); set HARNESS_TORCH to pick another.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${HARNESS_TORCH:-2.13.0}"
python -m pip install -q -e '.[dev]'
# the Ray executor's tests (tests/test_ray_executor.py skip, saying so, when Ray cannot be installed)
python -m pip install -q -e '.[ray]' || echo "could not install ray: the Ray executor tests will be skipped"
