"""Submissions: ``harness submit`` writes a bundle of a defense's cells; ``harness merge`` validates it
(tampered bundles are rejected in one line and the target store is left byte-identical) and inserts it
in one transaction."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from harness.cli import main
from harness.evaluation.runner import cell_key
from harness.results import Cell, Run, SampleResult, open_db


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(db: Path) -> tuple[int, int, int]:
    engine = open_db(str(db))
    with Session(engine) as s:
        counts = tuple(s.scalar(select(func.count()).select_from(t)) for t in (Run, Cell, SampleResult))
    engine.dispose()
    return counts


@pytest.fixture()
def bundle(tiny_cifar, tmp_path, classifier_file, one_thread) -> Path:
    out = tmp_path / "bundle"
    result = invoke("submit", "--defense", "none", "--classifier", classifier_file, "--n", "12", "--batch-size", "5",
                    "--attack", "pgd:steps=2", "--eps", "4/255,8/255", "--protocol", "adaptive", "--no-progress",
                    "--db", str(tmp_path / "mine.db"), "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture()
def target(tmp_path, classifier_file) -> Path:
    """Another store, with one cell of its own (so rejections can be checked against existing rows)."""
    from harness.evaluation.runner import RunRequest, run_grid

    db = tmp_path / "target.db"
    engine = open_db(str(db))
    run_grid(RunRequest(defenses=("none",), classifier=classifier_file, n=4, batch_size=4, protocols=("adaptive",),
                        attacks=({"name": "pgd", "steps": 1},), progress=False), engine)
    engine.dispose()
    return db


def test_bundle_holds_cells_samples_provenance_and_distribution(bundle):
    manifest = json.loads((bundle / "submission.json").read_text())
    assert manifest["format"] == "harness-submission" and manifest["entry"]["name"] == "none"
    assert manifest["distribution"]["name"] == "harness" and manifest["distribution"]["version"]
    assert manifest["distribution"]["module"] == "defenses.baseline"
    cells = json.loads((bundle / "cells.json").read_text())
    assert len(cells) == 2 and all(cell_key(c["config"]) == c["key"] for c in cells)
    assert all(c["config"]["weights_fingerprint"]["defense"] for c in cells)
    assert len(list(csv.DictReader(io.StringIO((bundle / "samples.csv").read_text())))) == 24
    assert json.loads((bundle / "runs.json").read_text())[0]["harness_version"]


def test_merge_inserts_in_one_go_and_refuses_a_second_time(bundle, target):
    before = _rows(target)
    result = invoke("merge", str(bundle), "--db", str(target), "--verify", "1")
    assert result.exit_code == 0, result.output
    assert "merged 2 cell(s), 24 sample(s), 1 run(s)" in result.output and "all agree" in result.output
    after = _rows(target)
    assert after == (before[0] + 1, before[1] + 2, before[2] + 24)
    sha = _sha(target)
    again = invoke("merge", str(bundle), "--db", str(target))
    assert again.exit_code != 0 and "is already in the results database: a merge never overwrites" in again.output
    assert _sha(target) == sha and _rows(target) == after


def test_tar_gz_bundle_merges_into_a_new_store(tiny_cifar, tmp_path, classifier_file, one_thread):
    out = tmp_path / "b.tar.gz"
    result = invoke("submit", "--defense", "none", "--classifier", classifier_file, "--n", "4", "--batch-size", "4",
                    "--attack", "pgd:steps=1", "--protocol", "adaptive", "--no-progress",
                    "--db", str(tmp_path / "mine.db"), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert invoke("merge", str(out), "--db", str(tmp_path / "new.db")).exit_code == 0
    assert _rows(tmp_path / "new.db")[1:] == (1, 4)


def _cells(path: Path) -> list[dict]:
    return json.loads((path / "cells.json").read_text())


def _samples(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO((path / "samples.csv").read_text())))


def _write_samples(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (path / "samples.csv").write_text(buffer.getvalue())


def _edit_accuracy(path: Path) -> None:
    cells = _cells(path)
    cells[0]["clean_acc"] = min(1.0, cells[0]["clean_acc"] + 1 / 12)
    (path / "cells.json").write_text(json.dumps(cells))


def _drop_sample(path: Path) -> None:
    _write_samples(path, _samples(path)[1:])


def _out_of_range(path: Path) -> None:
    rows = _samples(path)
    rows[3]["perturbation"] = "0.5"
    _write_samples(path, rows)


def _edit_key(path: Path) -> None:
    cells = _cells(path)
    old = cells[0]["key"]
    new = "f" * len(old)
    cells[0]["key"] = new
    (path / "cells.json").write_text(json.dumps(cells))
    manifest = json.loads((path / "submission.json").read_text())
    manifest["cells"] = [new if k == old else k for k in manifest["cells"]]
    (path / "submission.json").write_text(json.dumps(manifest))
    rows = _samples(path)
    for row in rows:
        row["cell_key"] = new if row["cell_key"] == old else row["cell_key"]
    _write_samples(path, rows)


def _edit_eps(path: Path) -> None:  # a key field edited without recomputing the key
    cells = _cells(path)
    cells[0]["config"]["threat"]["eps"] = 0.5
    (path / "cells.json").write_text(json.dumps(cells))


def _no_provenance(path: Path) -> None:
    cells = _cells(path)
    del cells[0]["config"]["weights_fingerprint"]
    (path / "cells.json").write_text(json.dumps(cells))


@pytest.mark.parametrize("tamper,message", [
    (_edit_accuracy, "clean accuracy 0.",),
    (_drop_sample, "11 samples for n = 12"),
    (_out_of_range, "has perturbation 0.5, outside the linf ball of eps"),
    (_edit_key, "the key does not match its config (recomputed "),
    (_edit_eps, "the key does not match its config"),
    (_no_provenance, "provenance incomplete: its config lacks weights_fingerprint"),
])
def test_tampered_bundle_is_rejected_and_the_store_unchanged(bundle, target, tamper, message):
    tamper(bundle)
    sha, rows = _sha(target), _rows(target)
    result = invoke("merge", str(bundle), "--db", str(target))
    assert result.exit_code == 1 and message in result.output, result.output
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1
    assert _sha(target) == sha and _rows(target) == rows


def test_duplicate_of_a_stored_cell_is_rejected(bundle, target, tmp_path):
    first = invoke("merge", str(bundle), "--db", str(target))
    assert first.exit_code == 0
    copy = shutil.copytree(bundle, tmp_path / "again")
    sha, rows = _sha(target), _rows(target)
    result = invoke("merge", str(copy), "--db", str(target))
    assert result.exit_code == 1 and "already in the results database" in result.output
    assert _sha(target) == sha and _rows(target) == rows


def test_submit_needs_one_known_defense(tiny_cifar, tmp_path):
    result = invoke("submit", "--defense", "nope", "--out", str(tmp_path / "b"), "--db", str(tmp_path / "x.db"))
    assert result.exit_code != 0 and "valid:" in result.output and not (tmp_path / "x.db").exists()
    result = invoke("merge", str(tmp_path / "missing"), "--db", str(tmp_path / "x.db"))
    assert "no bundle at" in result.output and not (tmp_path / "x.db").exists()


def test_key_fields_are_the_runners_key_config(tiny_cifar, classifier_file):
    """``KEY_FIELDS`` (what merge recomputes keys from) is exactly what the runner keys a cell by."""
    from harness.core.entry import defense_registry
    from harness.data import load_split
    from harness.evaluation.runner import KEY_FIELDS, RunRequest, check_request, plan_cells, variant_splits

    request = RunRequest(defenses=("none",), classifier=classifier_file, n=4, progress=False)
    entries, protocols, threats = check_request(request)
    splits = variant_splits(request, load_split("cifar10", "test"))
    (cell, *_) = plan_cells(request, defense_registry().get("none"), protocols, threats, "net", splits, {None: None})
    assert tuple(sorted(cell.key_config)) == tuple(sorted(KEY_FIELDS)) and cell_key(cell.key_config) == cell.key
