"""``harness verify``: stored cells recomputed from their configs in a scratch store, compared per sample,
with the weights' fingerprint telling other weights from other results; the verified store is only read.
And artifact training reproducible from its recipe: bit-identical weights in fresh processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session

from harness.cli import main
from harness.core.keys import state_fingerprint
from harness.evaluation.runner import RunRequest, cell_key, run_grid
from harness.results import Cell, SampleResult, open_db

REPO = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def stored(tiny_cifar, tmp_path, classifier_file, one_thread) -> Path:
    """A store with one finished `none` cell (12 samples, batches of 5)."""
    db = tmp_path / "r.db"
    engine = open_db(str(db))
    run_grid(RunRequest(defenses=("none",), classifier=classifier_file, n=12, batch_size=5,
                        attacks=({"name": "pgd", "steps": 2},), protocols=("adaptive",), progress=False), engine)
    engine.dispose()
    return db


def _verify(db: Path, *args: str):
    return CliRunner().invoke(main, ["verify", "--db", str(db), "--batch-size", "5", *args])


def _edit(db: Path, edit) -> None:
    engine = open_db(str(db))
    with Session(engine) as session:
        edit(session, session.scalar(select(Cell)))
        session.commit()
    engine.dispose()


def test_weights_fingerprint_is_provenance_not_key(stored, classifier_file):
    from harness.classifiers.sources import _from_file

    engine = open_db(str(stored))
    with Session(engine) as session:
        cell = session.scalar(select(Cell))
        weights = cell.config["weights_fingerprint"]
        assert cell_key(cell.config) == cell.key  # the key ignores the fingerprint
    from harness.data import dataset_info

    model = _from_file(Path(classifier_file), dataset_info("cifar10")).model
    assert weights["classifier"] == state_fingerprint(model.state_dict())
    assert weights["purifier"] == state_fingerprint({}) and len(weights["defense"]) == 16


def test_verify_agrees_and_only_reads_the_store(stored):
    before = _sha(stored)
    result = _verify(stored, "--cells", "3")
    assert result.exit_code == 0, result.output
    assert "all agree (12 samples recomputed)" in result.output and "weights match" in result.output
    assert "1 of 1 cell(s) verified: all agree" in result.output
    assert _sha(stored) == before


def test_verify_a_subset_recomputes_only_their_batches(stored):
    result = _verify(stored, "--samples", "1", "--format", "json")
    assert result.exit_code == 0, result.output
    (check,) = json.loads(result.output)
    assert check["agrees"] and check["chosen"] == 1 and check["compared"] in (2, 5)  # one batch of 5 (or the last, 2)


def test_other_results_are_a_disagreement(stored):
    def flip(session, cell):
        row = session.scalar(select(SampleResult).where(SampleResult.cell_id == cell.id)
                             .order_by(SampleResult.sample_index))
        row.adv_pred = (row.adv_pred + 1) % 10

    _edit(stored, flip)
    before = _sha(stored)
    result = _verify(stored)
    assert result.exit_code == 1
    assert "1 of 12 samples disagree" in result.output and "weights match (" in result.output
    assert "): other results" in result.output
    assert _sha(stored) == before


def test_other_weights_are_told_apart(stored):
    def retrained(session, cell):
        rows = session.scalars(select(SampleResult).where(SampleResult.cell_id == cell.id)).all()
        rows[0].clean_pred = (rows[0].clean_pred + 1) % 10
        cell.config = {**cell.config, "weights_fingerprint": {**cell.config["weights_fingerprint"],
                                                              "defense": "0" * 16, "classifier": "1" * 16}}

    _edit(stored, retrained)
    result = _verify(stored)
    assert result.exit_code == 1 and "weights differ (classifier 1111111111111111 -> " in result.output
    assert "other weights" in result.output


def test_bad_verify_input_is_one_line(stored, tmp_path):
    assert "no results database at" in _verify(tmp_path / "nope.db").output
    result = _verify(stored, "--cells", "0")
    assert result.exit_code != 0 and "--cells must be a whole number >= 1, got 0" in result.output
    assert "no finished cell 'abc'" in _verify(stored, "--key", "abc").output
    result = _verify(stored, "--defense", "maep")
    assert result.exit_code != 0 and "no finished cell of maep; valid: none" in result.output


def test_verify_chooses_among_one_defense(stored):
    result = _verify(stored, "--defense", "none", "--cells", "3")
    assert result.exit_code == 0, result.output
    assert "1 of 1 cell(s) verified: all agree" in result.output


TRAIN = r"""
import dataclasses, json, sys
sys.path.insert(0, sys.argv[1])
from conftest import write_imagefolder
from pathlib import Path
from harness.core.artifacts import ArtifactCache
from harness.classifiers.sources import resolve_classifier
from harness.core.keys import state_fingerprint
from harness.data import dataset_info, import_dataset
from harness.evaluation.building import train_defense_weights
from defenses.maep import MAEP
import_dataset("cifar10", write_imagefolder(Path(sys.argv[2]) / "if", per_class=4), progress=False)
info = dataset_info("cifar10")
tiny = {"pairs": {"n": 40, "eps": "8/255", "steps": 2, "step_size": "2/255", "batch_size": 20},
        "model": {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2, "decoder_dim": 16,
                  "decoder_depth": 1, "decoder_heads": 2, "mlp_ratio": 2.0},
        "train": {"mask_ratio": 0.5, "clean_fraction": 0.2, "epochs": 2, "batch_size": 8, "lr": 1e-3,
                  "weight_decay": 0.05}}
artifacts = ArtifactCache()
classifier = resolve_classifier(sys.argv[3], info, artifacts=artifacts, progress=False)
artifact = train_defense_weights(dataclasses.replace(MAEP, presets={"tiny": tiny}), "tiny", classifier, info,
                                 artifacts, progress=False)
print(json.dumps({"weights": state_fingerprint(artifact.load()), "provenance": artifact.provenance()}))
"""


@pytest.mark.slow  # two fresh processes (about 30 s on 2 shared cores)
def test_purifier_training_is_bit_identical_in_fresh_processes(tmp_path, classifier_file):
    """Two trainings of one (tiny) MAEP recipe in fresh processes, one with 1 and one with 2 OpenMP
    threads: the training pins its thread count, so the weights are bit-identical."""
    results = []
    for threads in ("1", "2"):
        home = tmp_path / f"home{threads}"
        env = {**os.environ, "HARNESS_HOME": str(home), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "PYTHONPATH": str(REPO)}
        for name in ("HARNESS_DATA", "HARNESS_ARTIFACTS", "HARNESS_DATA_MIRROR", "HARNESS_TRAIN_THREADS"):
            env.pop(name, None)
        out = subprocess.run([sys.executable, "-c", TRAIN, str(REPO / "tests"), str(home), classifier_file],
                             env=env, capture_output=True, text=True, timeout=300, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert results[0]["weights"] == results[1]["weights"]
    environment = results[0]["provenance"]["training_environment"]
    assert environment["threads"] == 2 and environment["deterministic_algorithms"] is True
