"""Results you can trust: a failing cell fails alone, kill -9 and Ctrl-C leave resumable cells, concurrent
runs on one store compute and store every cell once, and an artifact is trained once."""

from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from torch import nn

import harness.evaluation.runner as runner
from harness.cli import main
from harness.core.artifacts import ArtifactCache
from harness.core.entry import Defense, DefenseEntry, Kind, Purifier, defense_registry, registry_of
from harness.evaluation.runner import RunRequest, run_grid
from harness.results import Cell, Run, SampleResult, open_db
from harness.results.queries import add_samples, claim_cell, find_cell, touch_claim
from harness.results.schema import Claim

REPO = Path(__file__).resolve().parents[1]
#: the grid of the subprocess tests: 4 cells of 16 batches each
GRID = dict(eps=("4/255", "8/255"), seeds=(0, 1), n=64, batch_size=4)


def _cli_args(eps=GRID["eps"], seeds=GRID["seeds"]) -> list[str]:
    args = ["--defense", "none", "--eps", ",".join(eps), "--attack", "pgd:steps=10", "--protocol", "adaptive",
            "--n", str(GRID["n"]), "--batch-size", str(GRID["batch_size"]), "--no-progress"]
    return args + [a for s in seeds for a in ("--seed", str(s))]


class _Process:
    """``harness run`` in a subprocess on one torch thread, its output in files."""

    def __init__(self, tmp: Path, name: str, db: Path | str, classifier: str, args: list[str], claim_timeout: float):
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        env = dict(os.environ, OMP_NUM_THREADS="1", HARNESS_CLAIM_TIMEOUT=str(claim_timeout))
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "harness.cli", "run", *args, "--classifier", classifier, "--db", str(db)],
                cwd=REPO, env=env, stdout=out, stderr=err)

    def wait(self) -> int:
        return self.popen.wait(timeout=300)

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()


def _stored_samples(db: Path) -> int:
    """How many samples the store holds (read with sqlite3 directly, while another process writes)."""
    if not db.exists():
        return 0
    with sqlite3.connect(db, timeout=30) as connection:
        try:
            return connection.execute("SELECT count(*) FROM samples").fetchone()[0]
        except sqlite3.OperationalError:  # no tables yet
            return 0


def _wait_for_progress(process: _Process, db: Path, before: int) -> None:
    """Return once ``process`` has committed a batch beyond ``before`` samples, or exited."""
    while process.popen.poll() is None and _stored_samples(db) <= before:
        time.sleep(0.05)


def _samples(db: Path) -> list[tuple]:
    """Every stored sample, by cell key and index."""
    engine = open_db(str(db))
    with Session(engine) as session:
        rows = session.execute(select(Cell.key, SampleResult.sample_index, SampleResult.label, SampleResult.clean_pred,
                                      SampleResult.adv_pred, SampleResult.perturbation)
                               .join(Cell, SampleResult.cell_id == Cell.id)
                               .order_by(Cell.key, SampleResult.sample_index)).all()
    engine.dispose()
    return [tuple(row) for row in rows]


def _check_complete(db: Path | str, cells: int) -> None:
    """``cells`` cells, each done with exactly its n samples, each index once; no claim left."""
    engine = open_db(str(db))
    with Session(engine) as session:
        stored = list(session.scalars(select(Cell)))
        assert len(stored) == cells
        for cell in stored:
            indices = list(session.scalars(select(SampleResult.sample_index).where(SampleResult.cell_id == cell.id)))
            assert cell.status == "done" and cell.n_done == cell.n == len(indices) == len(set(indices))
        assert session.scalar(select(func.count()).select_from(Claim)) == 0
    engine.dispose()


def _run_statuses(db: Path) -> list[str]:
    engine = open_db(str(db))
    with Session(engine) as session:
        statuses = list(session.scalars(select(Run.status).order_by(Run.id)))
    engine.dispose()
    return statuses


@pytest.fixture()
def reference(tiny_cifar, tmp_path, classifier_file, one_thread) -> list[tuple]:
    """The per-sample results of the subprocess grid, computed in-process without interruption."""
    db = tmp_path / "reference.db"
    request = RunRequest(defenses=("none",), classifier=classifier_file, attacks=({"name": "pgd", "steps": 10},),
                         protocols=("adaptive",), progress=False, **GRID)
    assert {o.status for o in run_grid(request, open_db(str(db)))} == {"done"}
    return _samples(db)


def test_kill_9_at_random_moments_then_rerun_completes(tmp_path, classifier_file, reference):
    db = tmp_path / "r.db"
    rng = random.Random(1)
    for attempt in range(4):
        process = _Process(tmp_path, f"killed{attempt}", db, classifier_file, _cli_args(), claim_timeout=2)
        _wait_for_progress(process, db, _stored_samples(db))
        time.sleep(rng.uniform(0, 0.4))  # a random moment of the grid: mid-batch, mid-commit, between cells
        process.popen.send_signal(signal.SIGKILL)
        process.wait()
    final = _Process(tmp_path, "final", db, classifier_file, _cli_args(), claim_timeout=2)
    assert final.wait() == 0, final.output()
    _check_complete(db, cells=4)
    assert _samples(db) == reference
    statuses = _run_statuses(db)
    assert statuses[-1] == "done" and set(statuses[:-1]) <= {"running", "abandoned", "done"}


def test_ctrl_c_stops_at_a_batch_boundary_and_the_rerun_resumes(tmp_path, classifier_file, reference):
    db = tmp_path / "r.db"
    process = _Process(tmp_path, "interrupted", db, classifier_file, _cli_args(), claim_timeout=30)
    _wait_for_progress(process, db, 0)
    process.popen.send_signal(signal.SIGINT)
    assert process.wait() == 130
    err = process.err.read_text()
    assert re.search(r"^interrupted: \d+ cells done, rerun to resume$", err, re.MULTILINE), err
    assert err.count("interrupted:") == 1 and "Traceback" not in err
    assert _run_statuses(db) == ["interrupted"]
    engine = open_db(str(db))
    with Session(engine) as session:  # the cell in flight was left resumable, its claim released
        assert session.scalar(select(func.count()).select_from(Claim)) == 0
        assert all(c.status in ("done", "running") and c.n_done % GRID["batch_size"] == 0
                   for c in session.scalars(select(Cell)))
    engine.dispose()
    rerun = _Process(tmp_path, "rerun", db, classifier_file, _cli_args(), claim_timeout=30)
    assert rerun.wait() == 0, rerun.output()
    _check_complete(db, cells=4)
    assert _samples(db) == reference


def test_three_processes_on_one_store_compute_every_cell_once(tiny_cifar, tmp_path, classifier_file, db_url):
    db = db_url  # a SQLite file, or a PostgreSQL schema shared by the three processes
    grids = [(("4/255", "8/255"), (0, 1)), (("8/255",), (0, 1, 2)), (("4/255", "8/255"), (1, 2))]
    processes = [_Process(tmp_path, f"p{i}", db, classifier_file, _cli_args(eps, seeds), claim_timeout=60)
                 for i, (eps, seeds) in enumerate(grids)]
    codes = [p.wait() for p in processes]
    outputs = [p.output() for p in processes]
    assert codes == [0, 0, 0], outputs
    for output in outputs:
        assert "database is locked" not in output and "Traceback" not in output, output
    _check_complete(db, cells=6)
    # each cell was computed ("done") by exactly one process; the others skipped it
    computed = [tuple(line.split()[4:6]) for output in outputs for line in output.splitlines()
                if line.startswith("none ") and line.rstrip().endswith("  done")]
    assert sorted(computed) == sorted((eps, str(seed)) for eps in ("4/255", "8/255") for seed in (0, 1, 2))


# -- failing cells, in-process ----------------------------------------------------------------------
class _Raises(Purifier):
    def forward(self, x, noise):
        raise RuntimeError("purifier exploded")


class _NaN(Purifier):
    def forward(self, x, noise):
        return x * float("nan")


class _Cropped(Purifier):
    def forward(self, x, noise):
        return x[..., :16, :16]


def _unbuildable(ctx):
    raise OSError("weights not found")


def _purifier(name: str, purifier: type[Purifier]) -> DefenseEntry:
    return DefenseEntry(name=name, version="1", kind=Kind.PURIFIER, paper="p", citation="c",
                        build=lambda ctx: Defense(ctx.classifier, purifier()))


def _registry():
    torch.manual_seed(0)
    five = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5))  # 5 logits for 10 classes
    return registry_of(
        defense_registry().get("none"), _purifier("raises", _Raises), _purifier("nan", _NaN),
        _purifier("cropped", _Cropped),
        DefenseEntry(name="unbuildable", version="1", kind=Kind.PURIFIER, paper="p", citation="c", build=_unbuildable),
        DefenseEntry(name="five", version="1", kind=Kind.CLASSIFIER, paper="p", citation="c",
                     build=lambda ctx: Defense(five)),
        # its network is named by building it: no cell of it can be planned
        DefenseEntry(name="lost", version="1", kind=Kind.CLASSIFIER, paper="p", citation="c", build=_unbuildable))


ERRORS = {"raises": "RuntimeError: purifier exploded",
          "nan": "ValueError: the defense returned non-finite logits",
          "cropped": "ValueError: the purifier returned images of shape (5, 3, 16, 16)",
          "unbuildable": "OSError: weights not found", "lost": "OSError: weights not found",
          "five": "ValueError: the defense returned logits of shape (5, 5), expected (5, 10)"}


def test_failing_cells_fail_alone_and_are_retried(tiny_cifar, db_url, classifier_file, one_thread):
    engine = open_db(db_url)
    request = RunRequest(defenses=("raises", "none", "nan", "cropped", "unbuildable", "five", "lost"),
                         classifier=classifier_file, protocols=("adaptive",), seeds=(0, 1), n=12, batch_size=5,
                         attacks=({"name": "pgd", "steps": 2},), progress=False)
    outcomes = run_grid(request, engine, _registry())
    assert [(o.defense, o.status) for o in outcomes if o.seed != 1] == [
        ("raises", "failed"), ("none", "done"), ("nan", "failed"), ("cropped", "failed"), ("unbuildable", "failed"),
        ("five", "failed"), ("lost", "failed")]
    assert (outcomes[-1].key, outcomes[-1].seed) == ("", None)
    for o in outcomes:
        assert o.error.startswith(ERRORS[o.defense]) if o.status == "failed" else o.error == ""
    with Session(engine) as session:
        cells = list(session.scalars(select(Cell)))
        assert len(cells) == 12 and {c.status for c in cells if c.defense == "none"} == {"done"}
        assert all(c.error.startswith(ERRORS[c.defense]) for c in cells if c.status == "failed")
        assert session.scalar(select(Run.status)) == "failed"
    again = run_grid(request, engine, _registry())  # failed cells are not done: a rerun retries them
    assert [o.status for o in again] == [o.status if o.status == "failed" else "skipped" for o in outcomes]


def test_the_cli_prints_the_table_then_the_failures_and_exits_1(tiny_cifar, tmp_path, classifier_file,
                                                                  monkeypatch, one_thread):
    monkeypatch.setattr(runner, "defense_registry", _registry)
    result = CliRunner().invoke(main, ["run", "--defense", "none,nan,lost", "--classifier", classifier_file, "--n", "8",
                                       "--attack", "pgd:steps=1", "--protocol", "adaptive", "--no-progress",
                                       "--db", str(tmp_path / "r.db")])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert any(re.match(r"none .* done$", line) for line in lines)
    assert any(re.match(r"nan .* -\s+-\s+failed$", line) for line in lines)
    assert re.search(r"^2 cell\(s\) failed: nan adaptive PGD-1 eps=8/255 seed=0: ValueError: the defense returned "
                     r"non-finite logits .*; lost: OSError: weights not found$", result.output, re.MULTILINE)


# -- claims and the artifact lock -----------------------------------------------------------------------
def test_a_claim_blocks_until_it_expires_and_a_lost_claim_refuses_the_batch(tiny_cifar, db_url, classifier_file):
    engine = open_db(db_url)
    request = RunRequest(defenses=("none",), classifier=classifier_file, protocols=("adaptive",), n=4,
                         attacks=({"name": "pgd", "steps": 1},), progress=False)
    (outcome,) = run_grid(request, engine)
    assert claim_cell(engine, outcome.key, "a", timeout=60)
    assert not claim_cell(engine, outcome.key, "b", timeout=60)  # alive: held by a
    with Session(engine) as session:  # a was run 1: once b takes a's expired claim over, run 1 is abandoned
        session.get(Run, 1).status = "running"
        session.commit()
    assert claim_cell(engine, outcome.key, "b", timeout=0)
    with Session(engine) as session:
        assert not touch_claim(session, outcome.key, "a") and touch_claim(session, outcome.key, "b")
        assert session.get(Run, 1).status == "abandoned"
        cell = find_cell(session, outcome.key)
        row = dict(sample_index=0, label=0, clean_pred=0, adv_pred=0, perturbation=0.0, extra=None)
        existing = session.scalar(select(SampleResult.sample_index).where(SampleResult.cell_id == cell.id))
        assert add_samples(session, cell, [dict(row, sample_index=existing)]) == 0  # stored already: skipped


def test_two_threads_needing_one_artifact_train_it_once(tmp_path):
    cache = ArtifactCache(tmp_path / "artifacts")
    trained, start = [], threading.Barrier(2)

    def producer():
        trained.append(1)
        time.sleep(0.5)  # long enough for the other thread to find the artifact missing too
        return {"w": torch.zeros(1)}

    def get(found: list):
        start.wait()
        found.append(cache.get_or_train("test", {"what": "test"}, producer, what="a test artifact").path)

    found: list = []
    threads = [threading.Thread(target=get, args=(found,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(trained) == 1 and len(found) == 2 and found[0] == found[1]
