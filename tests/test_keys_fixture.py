"""Cell keys are stable across releases: the results DB of release 0.1.0 (``fixtures/results-0.1.0.db``,
made from ``fixtures/results-0.1.0.json``'s requests) is resumed by the current code with nothing
recomputed but its ``colored`` cell, and it still renders.

The one exception is deliberate: a variant cell is keyed by its images' content, and 0.1.0 computed the
``colored`` variant's colour transfer in float32, whose matrix products round differently on other CPUs (the
fixture's images came out other ones here, and differed again with torch's non-vectorised kernels). The
transfer now runs in float64, the same on every CPU (tests/test_variants.py checks it across torch's CPU
kernels), so that cell's key changed once; every other cell of 0.1.0 resumes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from conftest import write_imagefolder
from harness.classifiers.architectures import build_classifier
from harness.classifiers.sources import resolve_classifier, save_classifier
from harness.cli import main
from harness.core.artifacts import ArtifactCache
from harness.data import dataset_info, import_dataset
from harness.evaluation.runner import RunRequest, run_grid
from harness.results import Cell, SampleResult, open_db

FIXTURES = Path(__file__).parent / "fixtures"
RELEASE_DB = FIXTURES / "results-0.1.0.db"
RELEASE = json.loads((FIXTURES / "results-0.1.0.json").read_text())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def release_home(harness_home, tmp_path, one_thread) -> tuple[Path, Path]:
    """The release's data and classifier file recreated in a fresh home, and a copy of its DB."""
    import_dataset("cifar10", write_imagefolder(tmp_path / "if", per_class=8), progress=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_classifier("convnet-tiny", 10)
    classifier = save_classifier(model, "convnet-tiny", 10, tmp_path / "c.safetensors")
    db = Path(shutil.copy(RELEASE_DB, tmp_path / "results-0.1.0.db"))
    return classifier, db


def _request(spec: dict, classifier: Path) -> RunRequest:
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
    return RunRequest(classifier=str(classifier), batch_size=5, progress=False, **fields)


def test_release_db_is_resumed_without_recomputing(release_home, harness_home):
    committed = _sha256(RELEASE_DB)
    classifier, db = release_home
    engine = open_db(str(db))
    with Session(engine) as session:
        stored = {c.key: c for c in session.scalars(select(Cell))}
        samples = session.scalar(select(func.count()).select_from(SampleResult))
    assert set(stored) == {k for keys in RELEASE["keys"] for k in keys}
    assert {c.status for c in stored.values()} == {"done"} and samples == sum(c.n for c in stored.values())
    loaded = resolve_classifier(str(classifier), dataset_info("cifar10"),
                                artifacts=ArtifactCache(None, allow_train=False), progress=False)
    assert {c.classifier for c in stored.values()} == {loaded.id}

    found: set[str] = set()
    for spec, keys in zip(RELEASE["requests"], RELEASE["keys"]):
        outcomes = run_grid(_request(spec, classifier), engine)
        assert [o.status for o in outcomes] == ["done" if o.variant == "colored" else "skipped"
                                                for o in outcomes], spec
        outcomes = [o for o in outcomes if o.variant != "colored"]
        assert {o.key for o in outcomes} <= set(keys), spec
        for o in outcomes:  # `none` has no purifier: its adaptive cell now answers non-adaptive too
            assert o.defense != "none" or (o.protocol, set(o.requested)) == ("adaptive", set(spec["protocols"]))
        found |= {o.key for o in outcomes}
    expected = {k for k, c in stored.items() if (c.defense == "diffpure" or c.protocol == "adaptive")
                and c.variant != "colored"}
    assert expected <= found
    colored = [c for c in stored.values() if c.variant == "colored"]
    assert len(colored) == 1

    with Session(engine) as session:  # the recomputed colored cell is the only one added
        assert session.scalar(select(func.count()).select_from(SampleResult)) == samples + colored[0].n
        assert session.scalar(select(func.count()).select_from(Cell)) == len(stored) + 1
    engine.dispose()
    artifacts = harness_home / "artifacts"
    assert not artifacts.exists() or not any(artifacts.iterdir())  # no DDPM (nor classifier) trained

    out = db.parent / "out"
    result = CliRunner().invoke(main, ["report", "--db", str(db), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text()
    assert "diffpure" in page and "none" in page
    assert _sha256(RELEASE_DB) == committed


def test_saving_a_classifier_twice_gives_one_file(tmp_path):
    """safetensors orders the metadata differently from call to call; the file (and the id) must not."""
    model = build_classifier("convnet-tiny", 10)
    files = {save_classifier(model, "convnet-tiny", 10, tmp_path / "c.safetensors").read_bytes() for _ in range(16)}
    assert len(files) == 1
