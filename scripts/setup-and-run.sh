#!/usr/bin/env bash
# The main job: set up, then evaluate `none` and `maep` on CIFAR-10 and render the reports.
# Missing data are imported from $HARNESS_DATA_MIRROR; missing weights are trained (CPU presets).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. scripts/env.sh
harness run --defense none,maep --dataset cifar10 "$@"
harness report
