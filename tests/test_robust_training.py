"""Robust training: the objectives, the DRA term, resumable training, and the robust classifier entries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from harness.classifiers import training as training_module
from harness.classifiers.alignment import LayerFeatures, ProjectionHead, alignment_loss
from harness.classifiers.architectures import build_classifier
from harness.classifiers.objectives import InnerAttack, inner_attack, objective_loss
from harness.classifiers.training import (CLASSIFIER_PRESETS, AlignmentTargets, SyntheticData, train_classifier)
from harness.core.entry import Kind, defense_registry
from harness.core.errors import UsageError

TINY = {**CLASSIFIER_PRESETS["tiny"], "epochs": 3, "batch_size": 32, "subset": None}
FAST = {"eps": 8 / 255, "steps": 1, "step_size": None, "random_start": True}


def _data(n: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 32, 32, generator=g) * 255).to(torch.uint8), torch.randint(0, 10, (n,), generator=g)


def test_dra_loss_is_zero_when_aligned_and_lambda_when_orthogonal():
    z = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    assert alignment_loss(3 * z, z, 0.5).item() == pytest.approx(0.0, abs=1e-7)
    orthogonal = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    assert alignment_loss(orthogonal, z, 0.5).item() == pytest.approx(0.5)
    assert alignment_loss(-z, z, 0.5).item() == pytest.approx(1.0)  # opposite: 2 * lambda


def test_inner_attack_stays_in_the_ball_and_raises_the_loss():
    torch.manual_seed(0)
    model = build_classifier("convnet-tiny", 10).train()
    x, y = _data(16)
    x = x.float() / 255
    attack = InnerAttack.from_config({"steps": 5, "step_size": 2 / 255})
    loss = lambda logits: F.cross_entropy(logits, y, reduction="sum")
    x_adv = inner_attack(model, x, loss, attack, torch.Generator().manual_seed(0))
    assert model.training  # the attack ran in eval mode and restored the mode
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    model.eval()
    with torch.no_grad():
        assert loss(model(x_adv)) > loss(model(x))


def test_trades_loss_is_natural_loss_plus_beta_kl():
    torch.manual_seed(0)
    model = build_classifier("convnet-tiny", 10).eval()  # eval: the two forward passes see fixed BN stats
    x, y = _data(8)
    x = x.float() / 255
    out = objective_loss("trades", model, x, y, attack=InnerAttack.from_config(FAST), beta=0.0, label_smoothing=0.0,
                         generator=torch.Generator().manual_seed(0))
    assert out.loss.item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)
    more = objective_loss("trades", model, x, y, attack=InnerAttack.from_config(FAST), beta=6.0, label_smoothing=0.0,
                          generator=torch.Generator().manual_seed(0))
    assert more.loss.item() > out.loss.item()
    assert more.clean_features is None and more.adversarial_features is None  # no feature forward given


def test_layer_features_return_the_penultimate_or_a_named_layer():
    model = build_classifier("convnet-tiny", 10).eval()
    x = torch.rand(2, 3, 32, 32)
    logits, u = LayerFeatures(model, "penultimate")(x)
    assert torch.allclose(logits, model(x), atol=1e-6) and u.shape == (2, 64)
    _, mid = LayerFeatures(model, "groups.1")(x)
    assert mid.shape == (2, 32)
    with pytest.raises(UsageError, match="no layer 'nope'; valid: penultimate"):
        LayerFeatures(model, "nope")
    head = ProjectionHead(64, 7, hidden=16, layers=2)
    assert head(u).shape == (2, 7)


@pytest.mark.parametrize("config,message", [
    ({"objective": "madry"}, "unknown training objective 'madry'; valid: standard, pgd-at, trades"),
    ({"objective": "pgd-at", "inner": {"steps": 0}}, "inner attack steps must be at least 1"),
    ({"objective": "pgd-at", "inner": {"eps": 2.0}}, r"inner attack eps must be in \(0, 1\]"),
    ({"synthetic_ratio": 0.7}, "needs a synthetic training set"),
    ({"synthetic_ratio": 1.0}, r"synthetic_ratio must be in \[0, 1\)"),
    ({"align": {"lambda": 0.5}}, "needs one target per training image"),
    ({"align": {"lamda": 0.5}}, "unknown alignment keys"),
])
def test_bad_recipes_fail_before_training(config, message):
    x, y = _data(32)
    with pytest.raises(UsageError, match=message):
        train_classifier(x, y, 10, {**TINY, **config}, progress=False)


def test_synthetic_images_fill_their_share_of_every_batch(monkeypatch):
    x, y = _data(64)
    synthetic = SyntheticData(torch.full((40, 3, 32, 32), 7, dtype=torch.uint8), torch.zeros(40, dtype=torch.long))
    seen = []
    real = training_module.objective_loss

    def spy(name, model, inputs, labels, **kwargs):
        seen.append(inputs.detach().clone())
        return real(name, model, inputs, labels, **kwargs)

    monkeypatch.setattr(training_module, "objective_loss", spy)
    _, metrics = train_classifier(x, y, 10, {**TINY, "epochs": 1, "augment": False, "synthetic_ratio": 0.75},
                                  progress=False, synthetic=synthetic)
    assert metrics["steps"] == 64 // 32 and metrics["synthetic_images"] == 40
    for batch in seen:  # 8 real images, then 24 synthetic ones (all pixels 7/255)
        assert batch.shape[0] == 32
        assert torch.all(batch[8:] == 7 / 255) and not torch.all(batch[:8] == 7 / 255)


def _robust_config() -> dict:
    return {**TINY, "objective": "trades", "inner": FAST, "beta": 5.0, "ema": 0.9, "synthetic_ratio": 0.5,
            "align": {"lambda": 0.5, "head_hidden": 16}}


def _robust_inputs():
    x, y = _data(96)
    g = torch.Generator().manual_seed(1)
    synthetic = SyntheticData(*_data(40, seed=2))
    targets = AlignmentTargets(torch.randn(96, 12, generator=g), torch.randn(40, 12, generator=g))
    return x, y, synthetic, targets


def test_resumed_training_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    x, y, synthetic, targets = _robust_inputs()
    kwargs = dict(progress=False, synthetic=synthetic, align_targets=targets)
    uninterrupted, _ = train_classifier(x, y, 10, _robust_config(), **kwargs)
    checkpoint = tmp_path / "run.pt"
    save = training_module.TrainingCheckpoint.save

    def save_then_die(self, epoch, *args):
        save(self, epoch, *args)
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training_module.TrainingCheckpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(x, y, 10, _robust_config(), checkpoint=checkpoint, **kwargs)
    monkeypatch.setattr(training_module.TrainingCheckpoint, "save", save)
    assert checkpoint.is_file()
    resumed, metrics = train_classifier(x, y, 10, _robust_config(), checkpoint=checkpoint, **kwargs)
    assert metrics["resumed_from_epoch"] == 2 and not checkpoint.exists()
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_another_recipe_or_a_damaged_one_is_refused(tmp_path):
    x, y, synthetic, targets = _robust_inputs()
    checkpoint = tmp_path / "run.pt"
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="damaged or not a safe checkpoint") as error:
        train_classifier(x, y, 10, TINY, progress=False, checkpoint=checkpoint)
    assert "\n" not in str(error.value) and "weights_only" not in str(error.value)
    torch.save({"format": 1, "tag": "other"}, checkpoint)
    with pytest.raises(UsageError, match="belongs to another recipe"):
        train_classifier(x, y, 10, TINY, progress=False, checkpoint=checkpoint)


def test_a_checkpoint_with_a_pickle_payload_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    checkpoint = tmp_path / "run.pt"
    torch.save({"format": 1, "payload": Payload()}, checkpoint)
    x, y = _data(32)
    with pytest.raises(UsageError, match="not a safe checkpoint"):
        train_classifier(x, y, 10, TINY, progress=False, checkpoint=checkpoint)
    assert not marker.exists()


def _train_command(home: Path) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "HARNESS_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env.pop("HARNESS_DATA_MIRROR", None)
    return [sys.executable, "-m", "harness.cli", "train", "defense", "pgd-at", "--preset", "tiny"], env


def _weights(home: Path) -> dict[str, torch.Tensor]:
    (path,) = (home / "artifacts" / "defense" / "pgd-at").glob("*/weights.safetensors")
    return load_file(str(path))


def test_killed_harness_train_resumes_to_the_same_weights(harness_home, tmp_path):
    """``kill -9`` of ``harness train`` after its first checkpoint; the rerun resumes from it and ends
    with the weights of an uninterrupted run (in another home)."""
    import shutil

    from harness.data import import_dataset
    from conftest import write_imagefolder

    # 320 training images: the tiny preset's 256-image subset, 8 steps per epoch, 3 epochs
    import_dataset("cifar10", write_imagefolder(tmp_path / "images", per_class=32), progress=False)
    other = tmp_path / "other"
    shutil.copytree(harness_home, other)  # the same imported data, no artifacts yet
    command, env = _train_command(other)
    subprocess.run(command, env=env, check=True, capture_output=True)
    expected = _weights(other)

    command, env = _train_command(harness_home)
    checkpoints = harness_home / "artifacts" / ".checkpoints" / "defense" / "pgd-at"
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("*.pt")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "training finished before its first checkpoint: raise the tiny budget"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert list(checkpoints.glob("*.pt")) and not list((harness_home / "artifacts" / "defense").glob("pgd-at/*/weights*"))
    subprocess.run(command, env=env, check=True, capture_output=True)
    resumed = _weights(harness_home)
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    assert not list(checkpoints.glob("*.pt"))


# every classifier entry harness trains itself (loaded ones, e.g. the RobustBench zoo, have no recipe)
ROBUST = [e for e in (defense_registry().get(n) for n in defense_registry().names())
          if e.kind is Kind.CLASSIFIER and e.train is not None]


def test_the_robust_family_is_registered():
    names = {e.name for e in ROBUST}
    assert {"pgd-at", "trades", "trades-syn", "trades-dra", "trades-syn-dra"} <= names
    for entry in ROBUST:
        assert {"tiny", "small", "paper"} <= set(entry.presets) and entry.metadata.parameters
        assert entry.presets["paper"]["classifier"]["arch"] == "wrn-28-10"
    syn = defense_registry().get("trades-syn")
    assert syn.metadata.extra_data.kind == "synthetic" and syn.metadata.extra_data.size > 0
    assert "reconstructed" in defense_registry().get("trades-dra").description


@pytest.mark.parametrize("entry", ROBUST, ids=lambda e: e.name)
def test_every_classifier_entry_trains_and_evaluates_on_tiny_data(entry, tiny_cifar, tmp_path):
    """The per-entry smoke test: train the tiny preset, evaluate one cell, find the training record."""
    from sqlalchemy.orm import Session

    from harness.evaluation.runner import RunRequest, run_grid
    from harness.results.database import open_db
    from harness.results.schema import Cell

    engine = open_db(str(tmp_path / "r.db"))
    request = RunRequest(defenses=(entry.name,), preset="tiny", n=8, attacks=({"name": "pgd", "steps": 2},),
                         protocols=("adaptive",), progress=False)
    (outcome,) = run_grid(request, engine)
    assert outcome.status == "done" and outcome.robust_acc <= outcome.clean_acc
    with Session(engine) as session:
        (cell,) = session.query(Cell).all()
        training = cell.config["classifier_provenance"]["training"]
        assert training["objective"] == entry.presets["tiny"]["classifier"]["objective"]
        assert training["steps"] > 0 and training["seconds"] > 0


def test_the_report_compares_the_robust_entries_over_training_seeds(tiny_cifar, tmp_path):
    """Two training seeds of two entries and the undefended classifier, under AutoAttack: the Robust
    training table shows one row per entry with mean ± std and the training cost."""
    from harness.classifiers.sources import save_classifier
    from harness.evaluation.runner import RunRequest, run_grid
    from harness.report.writer import write_reports
    from harness.results.database import open_db

    torch.manual_seed(0)
    base = str(save_classifier(build_classifier("convnet-tiny", 10), "convnet-tiny", 10, tmp_path / "c.safetensors"))
    engine = open_db(str(tmp_path / "r.db"))
    common = dict(preset="tiny", n=6, attacks=({"name": "autoattack", "version": "standard"},),
                  protocols=("adaptive",), progress=False, classifier=base)
    for seed in (0, 1):
        run_grid(RunRequest(defenses=("pgd-at", "trades"), train_seed=seed, **common), engine)
    run_grid(RunRequest(defenses=("none",), **common), engine)
    paths = write_reports(engine, tmp_path / "out", ("md", "html"))
    text = (tmp_path / "out" / "robust-training.md").read_text()
    assert tmp_path / "out" / "robust-training.md" in paths
    rows = [line for line in text.splitlines() if line.startswith("| cifar10")]
    assert sorted(line.split(" | ")[3] for line in rows) == ["none", "pgd-at", "trades"]
    for line in rows:
        cells = line.split(" | ")
        if cells[3] != "none":
            assert cells[6] == "2" and "±" in cells[7] and cells[11] == "0"  # 2 seeds, clean mean ± std
            assert cells[12] == "3" and cells[13] == "6"  # the tiny preset: 3 epochs of 80 // 32 = 2 steps
    assert "Robust training" in (tmp_path / "out" / "index.html").read_text()


def test_the_robust_training_table_joins_representations_by_dataset_and_shows_no_preset_as_a_dash():
    """The undefended classifier on two datasets, one Representations row (CIFAR-10's): its effective rank
    and SAE loss go to the CIFAR-10 row only, and the baseline's missing preset reads "–"."""
    import pandas as pd

    from harness.report.robust_training import AUTOATTACK_LABEL, robust_training_table

    def cell(defense, dataset, seed=None, robust=0.2):
        provenance = ({"artifact_key": "k", "recipe": {"seed": seed, "preset": "small"},
                       "training": {"objective": "pgd-at", "steps": 975, "epochs": 5, "seconds": 180.0}}
                      if seed is not None else {"source": "base"})
        return {"status": "done", "attack_label": AUTOATTACK_LABEL, "protocol": "adaptive", "variant": "clean",
                "config": {"classifier_provenance": provenance}, "defense": defense, "dataset": dataset,
                "threat": "linf", "eps_text": "8/255", "n": 512, "classifier": f"{defense}-net",
                "clean_acc": 0.5, "robust_acc": robust}

    cells = pd.DataFrame([cell("pgd-at", "cifar10", seed=0), cell("none", "cifar10", robust=0.0),
                          cell("none", "fashion-mnist", robust=0.05)])
    rows = [({"defense": "none", "dataset": "cifar10", "train_seed": 0}, {"effective_rank": 84.4, "sae_loss": 0.089})]
    table = robust_training_table(cells, rows).set_index(["dataset", "entry"])
    assert table.loc[("cifar10", "none"), "effective rank"] == "84.4"
    assert table.loc[("fashion-mnist", "none"), "effective rank"] == "–"
    assert table.loc[("fashion-mnist", "none"), "SAE loss"] == "–"
    assert table.loc[("cifar10", "none"), "preset"] == "–" and table.loc[("cifar10", "pgd-at"), "preset"] == "small"
