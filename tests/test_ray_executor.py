"""``--executor ray``: a grid on a local 2-CPU Ray instance stores exactly the per-sample rows of the local
executor; a shard that fails once (raising, or its worker killed) is retried; one that always fails marks
its cell failed while the rest of the grid runs; a rerun resumes at shard granularity."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from harness.core.entry import Defense, DefenseEntry, Kind, Purifier, defense_registry, registry_of
from harness.evaluation.runner import RunRequest, evaluation_subset, run_grid
from harness.results import Cell, SampleResult, open_db

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'harness[ray]'): the Ray executor "
                                        "is not tested")
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One local Ray instance with 2 CPUs for the module (workers import this folder's modules)."""
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


class Noisy(Purifier):
    """Stochastic: adds the sample's fixed noise."""

    def forward(self, x, noise):
        return (x + 0.05 * noise.randn(x.shape[1:], device=x.device)).clamp(0, 1)


class Probe(Purifier):
    """The identity, failing on purpose: ``mode`` ``once`` (raise the first time, across processes: a
    marker file), ``kill`` (the first call kills its worker process), ``always``; ``forbidden`` images
    (batches holding one raise, so a recomputed stored sample fails the cell)."""

    def __init__(self, marker: Path, mode: str = "", forbidden: torch.Tensor | None = None):
        super().__init__()
        self.marker, self.mode, self.forbidden = marker, mode, forbidden

    def forward(self, x, noise):
        if self.mode == "always":
            raise RuntimeError("probe always fails")
        if self.mode in ("once", "kill") and not self.marker.exists():
            self.marker.touch()
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("probe fails once")
        if self.forbidden is not None and (x[:, None] == self.forbidden[None]).flatten(2).all(2).any():
            raise RuntimeError("probe saw a forbidden image")
        return x


def _registry(**probes: Probe):
    entries = [defense_registry().get("none"),
               DefenseEntry(name="noisy", version="1", kind=Kind.PURIFIER, paper="p", citation="c", stochastic=True,
                            build=lambda ctx: Defense(ctx.classifier, Noisy()))]
    for name, probe in probes.items():
        entries.append(DefenseEntry(name=name, version="1", kind=Kind.PURIFIER, paper="p", citation="c",
                                    build=lambda ctx, probe=probe: Defense(ctx.classifier, probe)))
    return registry_of(*entries)


def _request(classifier_file, **kw) -> RunRequest:
    base = dict(defenses=("none", "noisy"), classifier=classifier_file, eps=("4/255", "8/255"), n=12, batch_size=3,
                attacks=({"name": "pgd", "steps": 2},), protocols=("adaptive",), progress=False)
    return RunRequest(**{**base, **kw})


def _rows(engine) -> dict[str, list[tuple]]:
    with Session(engine) as s:
        out: dict[str, list[tuple]] = {}
        for cell in s.scalars(select(Cell)):
            out[cell.key] = s.execute(select(
                SampleResult.sample_index, SampleResult.label, SampleResult.clean_pred, SampleResult.adv_pred,
                SampleResult.perturbation, SampleResult.extra).where(SampleResult.cell_id == cell.id)
                .order_by(SampleResult.sample_index)).all()
        return out


def _count(engine) -> int:
    with Session(engine) as s:
        return s.scalar(select(func.count()).select_from(SampleResult))


def test_ray_stores_the_rows_of_local(tiny_cifar, tmp_path, classifier_file, one_thread):
    registry = _registry()
    local, remote = open_db(str(tmp_path / "local.db")), open_db(str(tmp_path / "ray.db"))
    first = run_grid(_request(classifier_file), local, registry)
    second = run_grid(_request(classifier_file, executor="ray"), remote, registry)
    assert len(first) == 4 and [o.status for o in second] == ["done"] * 4
    assert [(o.key, o.clean_acc, o.robust_acc) for o in first] == [(o.key, o.clean_acc, o.robust_acc) for o in second]
    rows = _rows(remote)
    assert rows == _rows(local) and all(len(r) == 12 for r in rows.values())
    with Session(local) as a, Session(remote) as b:
        flags = [{c.key: c.metrics["flags"] for c in s.scalars(select(Cell))} for s in (a, b)]
        assert flags[0] == flags[1]
        assert b.scalar(select(Cell)).run.device == "cpu (Ray local: 2 CPUs, 1 thread per shard)"
        assert a.scalar(select(Cell)).run.device == "cpu (1 threads)"


@pytest.mark.parametrize("mode", ["once", "kill"])
def test_a_shard_failing_once_is_retried(tiny_cifar, tmp_path, classifier_file, mode, caplog):
    registry = _registry(probe=Probe(tmp_path / "marker", mode))
    engine = open_db(str(tmp_path / "r.db"))
    (outcome,) = run_grid(_request(classifier_file, defenses=("probe",), eps=("8/255",), executor="ray"), engine,
                          registry)
    assert outcome.status == "done" and (tmp_path / "marker").exists()
    assert "retrying" in caplog.text
    assert _count(engine) == 12 and len({r[0] for r in _rows(engine)[outcome.key]}) == 12


def test_a_shard_failing_always_fails_its_cell_and_the_grid_goes_on(tiny_cifar, tmp_path, classifier_file,
                                                                     monkeypatch):
    monkeypatch.setenv("HARNESS_SHARD_RETRIES", "1")
    registry = _registry(broken=Probe(tmp_path / "marker", "always"))
    engine = open_db(str(tmp_path / "r.db"))
    outcomes = run_grid(_request(classifier_file, defenses=("broken", "none"), eps=("8/255",), executor="ray"),
                        engine, registry)
    assert [(o.defense, o.status) for o in outcomes] == [("broken", "failed"), ("none", "done")]
    assert "failed 2 times" in outcomes[0].error and "RuntimeError: probe always fails" in outcomes[0].error
    with Session(engine) as s:
        assert s.scalar(select(Cell.status).where(Cell.defense == "broken")) == "failed"


def test_a_rerun_resumes_at_shard_granularity(tiny_cifar, tmp_path, classifier_file, monkeypatch):
    from harness.data import load_split

    monkeypatch.setenv("HARNESS_SHARD_RETRIES", "0")
    test = load_split("cifar10", "test")
    order = evaluation_subset(len(test.labels), 12).tolist()
    # the last batch's images fail: its shard (the second of two on 2 CPUs) fails, the first is stored
    request = _request(classifier_file, defenses=("probe",), eps=("8/255",), executor="ray")
    engine = open_db(str(tmp_path / "r.db"))
    (failed,) = run_grid(request, engine, _registry(probe=Probe(tmp_path / "m", forbidden=test.float_images(
        torch.tensor(order[9:])))))
    assert failed.status == "failed" and "forbidden" in failed.error
    stored = [r[0] for r in _rows(engine)[failed.key]]
    assert sorted(stored) == sorted(order[:6])
    # the rerun refuses to see a stored sample again: it computes the failed shard only
    (done,) = run_grid(request, engine, _registry(probe=Probe(tmp_path / "m", forbidden=test.float_images(
        torch.tensor(stored)))))
    assert done.status == "done" and done.key == failed.key
    assert _count(engine) == 12 and sorted(r[0] for r in _rows(engine)[done.key]) == sorted(order)


def test_bad_device_and_address_are_one_line_errors(tiny_cifar, tmp_path, classifier_file):
    from harness.core.errors import UsageError

    engine = open_db(str(tmp_path / "r.db"))
    for kw, match in ((dict(device="cuda:0"), "cpu, cuda, auto"), (dict(device="tpu"), "cpu, cuda, cuda:N, auto"),
                      (dict(device="cuda"), "no GPU")):
        with pytest.raises(UsageError, match=match):
            run_grid(_request(classifier_file, executor="ray", **kw), engine, _registry())
    assert _count(engine) == 0
