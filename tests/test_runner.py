"""The runner and the store: cells keyed by hash, skipped when finished, resumed when interrupted (the
store tests on each back end: SQLite, and PostgreSQL when it is configured)."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from harness.classifiers.sources import save_classifier
from harness.core.errors import UsageError
from harness.classifiers.architectures import build_classifier
from harness.evaluation.runner import RunRequest, run_grid
from harness.results import Cell, Run, SampleResult, open_db


@pytest.fixture()
def classifier_file(tmp_path):
    torch.manual_seed(0)
    return str(save_classifier(build_classifier("convnet-tiny", 10), "convnet-tiny", 10, tmp_path / "c.safetensors"))


def _request(classifier_file, **kw):
    base = dict(defenses=("none",), classifier=classifier_file, n=12, batch_size=5,
                attacks=({"name": "pgd", "steps": 2},), progress=False)
    base.update(kw)
    return RunRequest(**base)


def _counts(engine):
    with Session(engine) as s:
        return (s.scalar(select(func.count()).select_from(Cell)),
                s.scalar(select(func.count()).select_from(SampleResult)))


def test_grid_stores_cells_and_samples_then_skips(tiny_cifar, db_url, classifier_file):
    engine = open_db(db_url)
    request = _request(classifier_file, eps=("4/255", "8/255"), seeds=(0, 1))
    first = run_grid(request, engine)
    # `none` has no purifier: non-adaptive and adaptive attack the same function, so one cell answers both
    assert len(first) == 2 * 2 and {o.status for o in first} == {"done"}
    assert {o.requested for o in first} == {("non-adaptive", "adaptive")} and {o.protocol for o in first} == {"adaptive"}
    assert _counts(engine) == (4, 4 * 12)
    with Session(engine) as s:
        for cell in s.scalars(select(Cell)):
            assert cell.status == "done" and cell.n_done == 12
            assert cell.robust_acc <= cell.clean_acc
            assert cell.avg_acc == pytest.approx((cell.clean_acc + cell.robust_acc) / 2)
            assert cell.config["dataset"]["fingerprint"] == cell.dataset_fingerprint
            assert cell.eps_text in ("4/255", "8/255") and cell.run.git_commit is not None
        assert s.scalar(select(func.count()).select_from(Run)) == 1
    second = run_grid(request, engine)
    assert {o.status for o in second} == {"skipped"}
    assert [(o.clean_acc, o.robust_acc) for o in first] == [(o.clean_acc, o.robust_acc) for o in second]
    forced = run_grid(_request(classifier_file, eps=("8/255",), seeds=(0,), force=True), engine)
    assert {o.status for o in forced} == {"done"} and _counts(engine) == (4, 48)


def test_same_seed_same_per_sample_results(tiny_cifar, tmp_path, classifier_file):
    rows = []
    for name in ("a.db", "b.db"):
        engine = open_db(str(tmp_path / name))
        run_grid(_request(classifier_file, protocols=("adaptive",)), engine)
        with Session(engine) as s:
            rows.append(s.execute(select(SampleResult.sample_index, SampleResult.clean_pred, SampleResult.adv_pred,
                                         SampleResult.perturbation).order_by(SampleResult.sample_index)).all())
    assert rows[0] == rows[1]


def test_interrupted_cell_resumes(tiny_cifar, db_url, classifier_file, monkeypatch):
    import harness.evaluation.runner as runner

    engine = open_db(db_url)
    request = _request(classifier_file, protocols=("adaptive",))
    real_finalise = runner.finish_cell

    def crash(session, cell):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "finish_cell", crash)
    with pytest.raises(KeyboardInterrupt):
        run_grid(request, engine)
    assert _counts(engine) == (1, 12)
    with Session(engine) as s:
        assert s.scalar(select(Cell.status)) == "running"
        assert s.scalar(select(Run.status).order_by(Run.id.desc())) == "interrupted"
    monkeypatch.setattr(runner, "finish_cell", real_finalise)

    def recompute(*args, **kwargs):
        raise AssertionError("a stored batch was recomputed")

    monkeypatch.setattr(runner.get_protocol("adaptive").__class__, "run", recompute)
    outcomes = run_grid(request, engine)
    assert outcomes[0].status == "done" and _counts(engine) == (1, 12)


@pytest.mark.parametrize("field,value,valid", [
    ("defenses", ("nope",), "none"),
    ("protocols", ("sideways",), "adaptive, adaptive-eot, bpda, non-adaptive"),
    ("eps", ("lots",), "8/255"),
    ("dataset", "svhn", "cifar10, cifar100"),
    ("attacks", ({"name": "pgd", "stepz": 1},), "bad options"),
])
def test_bad_input_is_a_clear_error_and_stores_nothing(tiny_cifar, tmp_path, classifier_file, field, value, valid):
    engine = open_db(str(tmp_path / "r.db"))
    run_grid(_request(classifier_file, protocols=("adaptive",)), engine)
    before = _counts(engine)
    with pytest.raises(UsageError, match=valid):
        run_grid(_request(classifier_file, **{field: value}), engine)
    assert _counts(engine) == before


def test_missing_classifier_with_no_train_refuses(tiny_cifar, tmp_path):
    engine = open_db(str(tmp_path / "r.db"))
    with pytest.raises(UsageError, match="not trained yet"):
        run_grid(RunRequest(defenses=("none",), classifier="trained:tiny", allow_train=False, n=4,
                            progress=False), engine)


def test_variants_and_purifier_quality_are_stored(tiny_cifar, db_url, classifier_file):
    import torch.nn.functional as F

    from harness.core.entry import Defense, DefenseEntry, Kind, Purifier, registry_of

    class Blur(Purifier):
        def forward(self, x, noise):
            return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)

    registry = registry_of(
        DefenseEntry(name="blur", version="1", kind=Kind.PURIFIER, paper="p", citation="c",
                     build=lambda ctx: Defense(ctx.classifier, Blur())))
    engine = open_db(db_url)
    outcomes = run_grid(_request(classifier_file, defenses=("blur",), protocols=("adaptive",),
                                 variants=("clean", "colored", "corrupt:contrast:3")), engine, registry)
    assert [o.variant for o in outcomes] == ["clean", "colored", "corrupt:contrast:3"]
    with Session(engine) as s:
        cells = {c.variant: c for c in s.scalars(select(Cell))}
        assert len({c.dataset_fingerprint for c in cells.values()}) == 3
        assert "variant corrupt:contrast:3" in cells["corrupt:contrast:3"].data_source
        for cell in cells.values():
            assert 10 < cell.metrics["psnr_clean"] < 100 and 0 < cell.metrics["ssim_clean"] < 1

    # the leaderboard keeps clean data and variants in separate tables, and names the data source once
    from harness.report.frame import aggregate_seeds, cells_frame, done_cells
    from harness.report.tables import build_tables

    tables = build_tables(aggregate_seeds(done_cells(cells_frame(engine))))
    assert [(t.variants, len(t.rows)) for t in tables] == [(False, 1), (True, 2)]
    assert tables[1].stem.endswith("_variants") and "dataset variants" in tables[1].title
    assert not any("variant" in note for t in tables for note in t.notes)
