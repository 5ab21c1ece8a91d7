#!/usr/bin/env bash
# CI check of the real RobustBench path (issue 9), offline: a separate venv (.venv-robustbench, reused when
# its pins and pyproject.toml are unchanged) with torch==2.14.1, torchvision==0.29.1, robustbench,
# setuptools<81 and harness; a random-weights WRN-28-10 saved where robustbench.utils.load_model looks for
# `Standard` (<model_dir>/cifar10/Linf/Standard.pt, model_dir = <artifact root>/robustbench), in a
# temporary artifact root; then `harness run --classifier robustbench:Standard` (the `none` entry) and
# `harness run --defense rb-standard` (the classifier entry of the same checkpoint) end to end, each on 8
# CIFAR-10 test images with PGD-2 under the adaptive protocol, with downloads blocked; then checks the
# results DB (a done cell of each, the same clean accuracy from the same weights), that the checkpoint was
# not replaced, and that `harness report` shows RobustBench's reported numbers. The main .venv is not
# touched. Data: the CIFAR-10 copy harness already has or imports from $HARNESS_DATA_MIRROR (as the main
# scripts set it), else a tiny synthetic CIFAR-10-shaped ImageFolder (one random image per class and split).
# Exits non-zero with "ci-robustbench: FAILED ..." on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
start=$SECONDS
venv="${HARNESS_RB_VENV:-$repo/.venv-robustbench}"
pins=("torch==2.14.1" "torchvision==0.29.1" "robustbench>=1.1" "setuptools<81")
tmp="$(mktemp -d "${TMPDIR:-/tmp}/ci-robustbench.XXXXXX")"
step="setup"

finish() {
  local rc=$?
  rm -rf "$tmp"
  if [ "$rc" -ne 0 ]; then
    echo "ci-robustbench: FAILED at step '$step' (exit $rc) after $((SECONDS - start)) s" >&2
  fi
  exit "$rc"
}
trap finish EXIT

say() { echo "ci-robustbench: $*"; }

# the data mirrors of the main scripts (scripts/env.sh without activating the main venv)
if [ -z "${HARNESS_DATA_MIRROR:-}" ] && [ -d "$repo/../shared/data" ]; then
  export HARNESS_DATA_MIRROR="$(cd "$repo/../shared/data" && pwd)"
fi
if [ -d /usr/share/datasets ]; then
  case ",${HARNESS_DATA_MIRROR:-}," in
    *,/usr/share/datasets,*) ;;
    *) export HARNESS_DATA_MIRROR="${HARNESS_DATA_MIRROR:+$HARNESS_DATA_MIRROR,}/usr/share/datasets" ;;
  esac
fi

step="venv"
stamp="$venv/.harness-ci-stamp"
want="$(printf '%s\n' "${pins[@]}" | cat - pyproject.toml | sha256sum | cut -d' ' -f1) $repo"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  say "reusing $venv"
else
  say "installing ${pins[*]} and harness into $venv"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  "$venv/bin/python" -m pip install -q "${pins[@]}" -e .
  echo "$want" > "$stamp"
fi
py="$venv/bin/python"
# robustbench 1.1.1 and torch 2.14 warn on import (pkg_resources, torch.jit.interface): not ours to fix
export PYTHONWARNINGS="ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning"

step="check the venv, write the checkpoint, find the data"
export HARNESS_ARTIFACTS="$tmp/artifacts"  # never the user's model_dir: these weights are random
export HARNESS_CLAIM_TIMEOUT=600
ckpt="$HARNESS_ARTIFACTS/robustbench/cifar10/Linf/Standard.pt"
# One process, as importing this torch build takes a while: the pins, and robustbench importable beside
# them; a random-weights checkpoint in the format of RobustBench's own files ({'state_dict': ...} with the
# 'module.' prefix of a DataParallel model, which load_model strips before its strict load_state_dict);
# then it prints the data root to use: empty for harness's own if it has (or can import) CIFAR-10, else a
# new one, for a tiny synthetic CIFAR-10-shaped ImageFolder, which it writes.
OMP_NUM_THREADS=1 "$py" - "$ckpt" "$tmp" > "$tmp/data-root" <<'PYTHON'
import importlib.util
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image


def say(text: str) -> None:
    print(f"ci-robustbench: {text}", file=sys.stderr)


assert torch.__version__.split("+")[0] == "2.14.1", f"torch {torch.__version__}, want 2.14.1"
assert torchvision.__version__.split("+")[0] == "0.29.1", f"torchvision {torchvision.__version__}, want 0.29.1"
assert importlib.util.find_spec("torchattacks") is None, "torchattacks must not be installed"
from harness.api import MissingArtifactError, dataset_info, import_robustbench, load_split

import_robustbench()  # robustbench imports beside this torch (with the autoattack -> pyautoattack alias)
say(f"torch {torch.__version__}, torchvision {torchvision.__version__}, robustbench {version('robustbench')}, "
    f"setuptools {version('setuptools')}")
from robustbench.model_zoo import model_dicts
from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

path, tmp = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]["Standard"]["model"]()
path.parent.mkdir(parents=True, exist_ok=True)
torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
say(f"wrote {type(model).__name__} ({sum(p.numel() for p in model.parameters())} parameters, random) to {path}")

try:
    load_split("cifar10", "test")
    print("")
except MissingArtifactError as exc:
    say(f"no CIFAR-10 here ({str(exc).splitlines()[0][:100]}...); using a synthetic ImageFolder")
    folder, rng = tmp / "synthetic-cifar10", np.random.default_rng(0)
    for split in ("train", "test"):
        for name in dataset_info("cifar10").classes:
            (folder / split / name).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / split / name / "0.png")
    print(tmp / "data")
PYTHON
sum_before="$(sha256sum "$ckpt" | cut -d' ' -f1)"
if [ -n "$(cat "$tmp/data-root")" ]; then
  export HARNESS_DATA="$(cat "$tmp/data-root")"
  "$venv/bin/harness" data import cifar10 "$tmp/synthetic-cifar10"
fi

# no download can happen: load_model must find the file; any HTTP(S) request fails at once
offline=(env HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 http_proxy=http://127.0.0.1:9
         https_proxy=http://127.0.0.1:9 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1)
db="$tmp/results.db"
common=(--dataset cifar10 --n 8 --attack pgd:steps=2 --protocol adaptive --db "$db" --no-train --no-progress)

step="harness run --classifier robustbench:Standard"
say "$step"
"${offline[@]}" "$venv/bin/harness" run --defense none --classifier robustbench:Standard "${common[@]}"

step="harness run --defense rb-standard"
say "$step"
"${offline[@]}" "$venv/bin/harness" run --defense rb-standard "${common[@]}"

step="check the results DB"
"$py" - "$db" <<'PYTHON'
import sqlite3
import sys

rows = sqlite3.connect(sys.argv[1]).execute(
    "SELECT defense, classifier, status, n, n_done, clean_acc, robust_acc, error FROM cells").fetchall()
for row in rows:
    print("ci-robustbench: cell", row)
base = [r for r in rows if r[0] == "none" and r[1] == "robustbench:Standard" and r[2] == "done" and r[4] == 8]
entry = [r for r in rows if r[0] == "rb-standard" and r[1].startswith("rb-standard@") and r[2] == "done" and r[4] == 8]
assert len(rows) == 2 and len(base) == 1 and len(entry) == 1, "want one done cell of each run, 8 images each"
assert base[0][5] == entry[0][5], f"same weights, same images, different clean accuracy: {base[0][5]} vs {entry[0][5]}"
assert 0 <= base[0][6] <= base[0][5] and 0 <= entry[0][6] <= entry[0][5], "robust accuracy out of range"
PYTHON
[ "$(sha256sum "$ckpt" | cut -d' ' -f1)" = "$sum_before" ] || { echo "ci-robustbench: $ckpt was replaced" >&2; exit 1; }

step="harness report"
"$venv/bin/harness" report --db "$db" --out "$tmp/report" --format md >/dev/null
grep -rq "94.78" "$tmp/report" || { echo "ci-robustbench: RobustBench's reported 94.78 is not in the report" >&2; exit 1; }

say "passed in $((SECONDS - start)) s (robustbench:Standard and rb-standard, torch 2.14.1, offline)"
