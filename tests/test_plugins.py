"""Third-party plugins through the entry-point groups, driven through the ``harness`` command: a classifier
entry with its own weights, option errors, broken and duplicate plugins, and an attack plugin.

The plugins in ``tests/plugins`` are pip-installed once into a throwaway site folder that the commands
see through ``PYTHONPATH``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from torch import nn

import harness
from conftest import CLASSES
from harness.cli import main
from harness.results.database import open_db
from harness.results.schema import Cell, Run, SampleResult

PLUGINS = Path(__file__).parent / "plugins"
FIRST_PARTY = sorted(p.name for p in entry_points(group="harness.defenses") if p.dist and p.dist.name == "harness")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Every plugin of ``tests/plugins`` installed (pip, no deps) into one throwaway site folder."""
    target = tmp_path_factory.mktemp("site")
    sources = tmp_path_factory.mktemp("src")
    copies = [str(shutil.copytree(p, sources / p.name)) for p in sorted(PLUGINS.iterdir()) if p.is_dir()]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), *copies], check=True)
    return target


@pytest.fixture()
def weights(tiny_cifar, tmp_path) -> Path:
    """Weights for the tiny-net plugin: the nearest-mean-colour classifier of the tiny training split."""
    spec = importlib.util.spec_from_file_location("tiny_net", PLUGINS / "tiny_net" / "tiny_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    means = torch.tensor(np.stack([
        np.mean([np.asarray(Image.open(f), dtype=np.float64).mean((0, 1)) / 255
                 for f in sorted((tiny_cifar / "train" / name).iterdir())], axis=0) for name in CLASSES]),
        dtype=torch.float32)
    network = module.TinyNet()
    with torch.no_grad():  # argmax of -|x - mean|^2 = argmax of 2 x.mean - |mean|^2
        network.head.weight.copy_(2 * means)
        network.head.bias.copy_(-(means ** 2).sum(1))
    path = tmp_path / "tiny-net.safetensors"
    save_file(network.state_dict(), str(path))
    return path


def _harness(args: list[str], site: Path, **env: str) -> subprocess.CompletedProcess:
    """``harness ARGS`` in a fresh process that sees the plugins of ``site`` (on one torch thread)."""
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1", **env), timeout=300)


def _cells(db: Path) -> list[Cell]:
    engine = open_db(str(db))
    with Session(engine) as session:
        cells = list(session.scalars(select(Cell).order_by(Cell.id)))
    engine.dispose()
    return cells


def _counts(db: Path) -> dict[str, int]:
    engine = open_db(str(db))
    with Session(engine) as session:
        counts = {t.__tablename__: session.scalar(select(func.count()).select_from(t))
                  for t in (Run, Cell, SampleResult)}
    engine.dispose()
    return counts


def test_classifier_plugin_loads_its_own_weights(site, weights, harness_home, tmp_path):
    env = {"HARNESS_HOME": str(harness_home), "TINY_NET_WEIGHTS": str(weights)}
    args = ["run", "--defense", "tiny-net", "--n", "8", "--attack", "pgd:steps=2", "--no-progress"]
    first = _harness([*args, "--db", str(tmp_path / "a.db")], site, **env)
    assert first.returncode == 0, first.stderr
    assert "(also non-adaptive: no purifier)" in first.stdout
    (cell,) = _cells(tmp_path / "a.db")  # the two default protocols: one cell
    assert cell.protocol == "adaptive" and cell.status == "done"
    assert "no purifier" in cell.config["protocol_note"]
    assert cell.clean_acc == 1.0  # the weights of the file, not an initialisation
    network = cell.config["classifier"]
    assert network.startswith("tiny-net@") and "trained:small" not in network
    provenance = cell.config["classifier_provenance"]
    assert provenance["source"] == "entry" and provenance["module"] == "tiny_net.TinyNet"
    distribution = cell.config["entry"]["distribution"]
    assert (distribution["name"], distribution["version"]) == ("harness-tiny-net", "0.3.0")

    no_train = _harness([*args, "--no-train", "--db", str(tmp_path / "b.db")], site, **env)
    assert no_train.returncode == 0, no_train.stderr
    (again,) = _cells(tmp_path / "b.db")
    assert again.key == cell.key  # the same weights, loaded by another process: the same cell

    artifacts = harness_home / "artifacts"
    assert not (artifacts / "classifier").exists()
    assert not artifacts.exists() or not any(artifacts.iterdir())


def test_unknown_options_fail_before_anything_is_stored(tiny_cifar, tmp_path):
    """First-party entries only, so the command runs in this process."""
    db = tmp_path / "r.db"
    torch.manual_seed(0)
    harness.evaluate(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), n=4, attacks="pgd:steps=1",
                     protocols="adaptive", db=str(db), progress=False)
    before = _counts(db)
    assert before["cells"] == 1 and before["samples"] == 4

    common = ["--n", "4", "--attack", "pgd:steps=1", "--no-progress", "--db", str(db)]
    unknown = CliRunner().invoke(main, ["run", "--defense", "maep", "--option", "unknown=1", *common])
    assert unknown.exit_code != 0
    assert unknown.stderr.strip().splitlines() == [
        "Error: no defense of this run has an option 'unknown'; valid options: maep: (none)"]
    typo = CliRunner().invoke(main, ["run", "--defense", "diffpure", "--option", "tsar=0.2", *common])
    assert typo.exit_code != 0
    (line,) = typo.stderr.strip().splitlines()
    assert "'tsar' (did you mean 'tstar'?)" in line and "diffpure: tstar" in line
    assert _counts(db) == before

    shown = CliRunner().invoke(main, ["list", "--defense", "maep"])
    assert shown.exit_code == 0, shown.output
    for text in ("maep 1 (purifier, defense) [harness==", "options:     (none)",
                 "presets:     small, paper (default small)", "metadata:    architecture ViT masked autoencoder",
                 "cifar10 linf 8/255 non-adaptive", "robust 88.73"):
        assert text in shown.stdout


def test_broken_and_duplicate_plugins_are_listed_and_the_rest_works(site, tiny_cifar, classifier_file,
                                                                      harness_home, tmp_path):
    env = {"HARNESS_HOME": str(harness_home)}
    listed = _harness(["list"], site, **env)
    assert listed.returncode == 0, listed.stderr
    rows = {tuple(line.split()[:2]) for line in listed.stdout.splitlines()[1:]}
    errors = [line for line in listed.stdout.splitlines() if " ERROR " in line]
    assert len(errors) == 2
    assert any(line.startswith("broken-plugin ") and "[harness-broken==0.1.0]: RuntimeError: broken on purpose"
               in line for line in errors)
    assert any(line.startswith("none ") and "[harness-duplicate==0.1.0]: duplicate defense name 'none': "
               "already provided by harness==" in line for line in errors)
    assert "maep" in FIRST_PARTY
    for name in (*FIRST_PARTY, "tiny-net"):
        assert any(row[0] == name and row[1] != "ERROR" for row in rows), name

    db = tmp_path / "r.db"
    ran = _harness(["run", "--defense", "none", "--classifier", classifier_file, "--n", "8",
                    "--attack", "pgd:steps=2", "--no-progress", "--db", str(db)], site, **env)
    assert ran.returncode == 0, ran.stderr
    (cell,) = _cells(db)
    assert cell.config["entry"]["distribution"]["name"] == "harness"  # harness's own `none`, not the impostor


def test_attack_plugin_runs_and_is_listed(site, weights, harness_home, tmp_path):
    env = {"HARNESS_HOME": str(harness_home), "TINY_NET_WEIGHTS": str(weights)}
    listed = _harness(["list", "--attacks"], site, **env)
    assert listed.returncode == 0, listed.stderr
    (line,) = [row for row in listed.stdout.splitlines() if row.split()[:1] == ["fgsm"]]
    assert "one signed-gradient step" in line and "(Goodfellow, Shlens & Szegedy, ICLR 2015)" in line
    assert line.endswith("[harness-fgsm==0.1.0]")

    db = tmp_path / "r.db"
    ran = _harness(["run", "--defense", "tiny-net", "--attack", "fgsm:scale=0.5", "--n", "16", "--no-progress",
                    "--db", str(db)], site, **env)
    assert ran.returncode == 0, ran.stderr
    (cell,) = _cells(db)
    assert cell.attack == "fgsm"
    assert cell.config["attack"] == {"name": "fgsm", "norm": "linf", "scale": 0.5}
    engine = open_db(str(db))
    with Session(engine) as session:
        samples = list(session.scalars(select(SampleResult)))
    engine.dispose()
    assert len(samples) == 16 and all(s.clean_pred == s.label for s in samples)
    # every (correctly classified, hence attacked) image moved by exactly one step of 0.5 * 8/255
    assert all(abs(s.perturbation - 4 / 255) < 1e-6 for s in samples)
