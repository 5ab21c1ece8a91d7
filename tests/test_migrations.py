"""Alembic migrations of the results store: the committed DB of schema version 2 (harness 0.2.0,
``fixtures/results-schema2.db``, made by ``fixtures/make_results_schema2.py`` from the requests in its
``.json``) is upgraded on open, on SQLite and on PostgreSQL (its rows loaded into a schema-2 store there),
with its cells done and per-sample rows intact, a backup of the SQLite file first, idempotently, once
when processes open it at once, and atomically; then it is resumed without recomputing anything."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import MetaData, create_engine, func, inspect, select, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

import harness.results.migrate as migrate
from conftest import BACKENDS, postgres_schema, postgres_url, write_imagefolder
from harness.classifiers.architectures import build_classifier
from harness.classifiers.sources import save_classifier
from harness.cli import main
from harness.core.errors import UsageError
from harness.data import import_dataset
from harness.evaluation.runner import RunRequest, run_grid
from harness.results import Analysis, Cell, SampleResult, open_db
from harness.results.database import resolve_url, upgrade_db
from harness.results.migrate import alembic_config, head_revision, store_state
from harness.results.queries import analysis_key
from harness.results.schema import SCHEMA_VERSION, Base

FIXTURES = Path(__file__).parent / "fixtures"
SCHEMA2_DB = FIXTURES / "results-schema2.db"
SCHEMA2 = json.loads((FIXTURES / "results-schema2.json").read_text())
BASELINE = "0001"
#: the fixture's tables, parents first
TABLES = ("runs", "cells", "samples", "analyses", "claims", "store_info")


def _dump(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
        return list(connection.iterdump())


def _load_into_postgres(url: str) -> None:
    """A PostgreSQL store of harness 0.2.0 holding the fixture's rows: the schema-2 tables (the baseline
    revision), without ``alembic_version`` (0.2.0 had none)."""
    command.upgrade(alembic_config(url), BASELINE)
    source = create_engine(f"sqlite:///file:{SCHEMA2_DB}?mode=ro&uri=true", poolclass=NullPool)
    target = create_engine(url, poolclass=NullPool)
    old, new = MetaData(), MetaData()
    old.reflect(source)
    new.reflect(target)
    with source.connect() as read, target.begin() as write:
        write.execute(text("DROP TABLE alembic_version"))
        write.execute(new.tables["store_info"].delete())
        for name in TABLES:
            rows = [dict(row._mapping) for row in read.execute(select(old.tables[name]))]
            if rows:
                write.execute(new.tables[name].insert(), rows)
            if "id" in new.tables[name].c:
                write.execute(text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), "
                                   f"(SELECT coalesce(max(id), 0) + 1 FROM {name}), false)"))
    source.dispose()
    target.dispose()


@contextlib.contextmanager
def schema2_store(backend: str, folder: Path) -> Iterator[str]:
    """A store of schema version 2 holding the fixture's rows: a copy of the committed file on SQLite
    (never the file itself), the same rows on PostgreSQL."""
    if backend == "sqlite":
        yield str(shutil.copy(SCHEMA2_DB, folder / "results.db"))
        return
    with postgres_schema(postgres_url()) as url:
        _load_into_postgres(url)
        yield url


@pytest.fixture(params=BACKENDS)
def old_store(request, tmp_path) -> Iterator[str]:
    committed = SCHEMA2_DB.read_bytes()
    with schema2_store(request.param, tmp_path) as url:
        yield url
    assert SCHEMA2_DB.read_bytes() == committed  # the committed fixture is never changed


def _state(url: str) -> migrate.StoreState:
    engine = create_engine(resolve_url(url), poolclass=NullPool)
    with engine.connect() as connection:
        state = store_state(connection)
    engine.dispose()
    return state


def _samples(engine) -> dict[str, list[list]]:
    with Session(engine) as session:
        rows = session.execute(select(Cell.key, SampleResult.sample_index, SampleResult.label, SampleResult.clean_pred,
                                      SampleResult.adv_pred, SampleResult.perturbation, SampleResult.extra)
                               .join(Cell, SampleResult.cell_id == Cell.id)
                               .order_by(Cell.id, SampleResult.sample_index)).all()
    found: dict[str, list[list]] = {}
    for key, *row in rows:
        found.setdefault(key, []).append(row)
    return found


def _stored_times() -> dict[str, dt.datetime]:
    """The cells' start times in the committed fixture (naive UTC text), as aware datetimes."""
    with contextlib.closing(sqlite3.connect(f"file:{SCHEMA2_DB}?mode=ro", uri=True)) as connection:
        return {key: dt.datetime.fromisoformat(when).replace(tzinfo=dt.timezone.utc)
                for key, when in connection.execute("SELECT key, started_at FROM cells")}


def _backups(url: str) -> list[Path]:
    if "://" in url:
        return []
    return sorted(Path(url).parent.glob(Path(url).name + ".bak-*"))


def test_the_fixture_is_a_store_of_schema_2():
    state = _state(str(SCHEMA2_DB))
    assert state.schema_version == "2" and not state.stamped and state.revision == BASELINE
    assert SCHEMA2["schema_version"] == 2 and migrate._revisions()[-1] == (head_revision(), SCHEMA_VERSION)


def test_schema2_store_is_upgraded_on_open_with_its_cells_and_samples_intact(old_store):
    assert _state(old_store).revision == BASELINE
    engine = open_db(old_store)
    state = _state(old_store)
    assert state.revisions == (head_revision(),) and state.schema_version == str(SCHEMA_VERSION)
    if engine.dialect.name == "sqlite":
        [backup] = _backups(old_store)
        assert backup.name == f"results.db.bak-{BASELINE}" and _dump(backup) == _dump(SCHEMA2_DB)
    with engine.connect() as connection:  # the migrated tables are exactly the models
        assert compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                Base.metadata) == []
    keys = [key for group in SCHEMA2["keys"] for key in group]
    with Session(engine) as session:
        cells = {c.key: c for c in session.scalars(select(Cell))}
        assert sorted(cells) == sorted(keys) and {c.status for c in cells.values()} == {"done"}
        assert all(c.n_done == c.n and c.finished_at.tzinfo is not None for c in cells.values())
        assert all(c.finished_at >= c.started_at and c.run.started_at.utcoffset().total_seconds() == 0
                   for c in cells.values())
        assert {key: cell.started_at for key, cell in cells.items()} == _stored_times()  # the same instants
        [analysis] = session.scalars(select(Analysis))
        wanted = SCHEMA2["analysis"]
        assert (analysis.kind, analysis.config, analysis.result) == (wanted["kind"], wanted["config"], wanted["result"])
        assert analysis.key == analysis_key(wanted["kind"], wanted["config"])
    assert _samples(engine) == SCHEMA2["samples"]
    engine.dispose()

    again = open_db(old_store)  # idempotent: nothing to do, no second backup
    assert _backups(old_store) == ([] if "://" in old_store else [backup])
    assert _samples(again) == SCHEMA2["samples"]
    done, _ = upgrade_db(old_store)
    assert not done.changed and done.after == head_revision()
    again.dispose()


@pytest.fixture()
def schema2_data(harness_home, tmp_path, one_thread) -> Path:
    """The fixture's data and classifier file recreated in a fresh home."""
    import_dataset("cifar10", write_imagefolder(tmp_path / "if", per_class=8), progress=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_classifier("convnet-tiny", 10)
    return save_classifier(model, "convnet-tiny", 10, tmp_path / "c.safetensors")


def test_upgraded_store_is_resumed_without_recomputing(old_store, schema2_data):
    """Every cell of the upgraded store, the ``colored`` one included, is found done: nothing is recomputed."""
    engine = open_db(old_store)
    for spec, keys in zip(SCHEMA2["requests"], SCHEMA2["keys"]):
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
        outcomes = run_grid(RunRequest(classifier=str(schema2_data), batch_size=5, progress=False, **fields), engine)
        assert [o.status for o in outcomes] == ["skipped"] * len(keys)
        assert [o.key for o in outcomes] == keys
    assert _samples(engine) == SCHEMA2["samples"]
    engine.dispose()


def test_downgrade_to_the_baseline_and_back_keeps_every_row(old_store):
    open_db(old_store).dispose()
    url = resolve_url(old_store)
    command.downgrade(alembic_config(url), BASELINE)
    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as connection:
        assert "index" in {c["name"] for c in inspect(connection).get_columns("samples")}
        assert store_state(connection).schema_version == "2"
        assert connection.scalar(text("SELECT count(*) FROM samples")) == sum(map(len, SCHEMA2["samples"].values()))
    engine.dispose()
    engine = open_db(old_store)
    assert _state(old_store).revisions == (head_revision(),) and _samples(engine) == SCHEMA2["samples"]
    engine.dispose()


def test_processes_opening_an_old_store_at_once_migrate_it_once(old_store):
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def opener() -> None:
        barrier.wait()
        try:
            open_db(old_store).dispose()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(_backups(old_store)) == (0 if "://" in old_store else 1)
    engine = open_db(old_store)
    assert _state(old_store).revisions == (head_revision(),) and _samples(engine) == SCHEMA2["samples"]
    engine.dispose()


def test_a_failed_upgrade_leaves_the_store_as_it_was(old_store, monkeypatch):
    real = command.upgrade

    def upgrade_then_fail(config, revision):
        real(config, revision)  # every revision ran, in the transaction: then it fails before the commit
        raise RuntimeError("disk full")

    monkeypatch.setattr(migrate.command, "upgrade", upgrade_then_fail)
    before = _dump(Path(old_store)) if "://" not in old_store else None
    with pytest.raises(RuntimeError, match="disk full"):
        open_db(old_store)
    state = _state(old_store)
    assert state.schema_version == "2" and not state.stamped and "samples" in state.tables
    if before is not None:
        assert _dump(Path(old_store)) == before
    monkeypatch.setattr(migrate.command, "upgrade", real)
    engine = open_db(old_store)
    assert _samples(engine) == SCHEMA2["samples"]
    engine.dispose()
    if before is not None:  # the first attempt's backup is kept; the second has a name of its own
        assert [p.name for p in _backups(old_store)] == [f"results.db.bak-{BASELINE}", f"results.db.bak-{BASELINE}.1"]


def test_harness_db_status_and_upgrade(tmp_path):
    db = str(shutil.copy(SCHEMA2_DB, tmp_path / "results.db"))
    runner = CliRunner()
    status = runner.invoke(main, ["db", "status", "--db", db])
    assert status.exit_code == 0 and f"revision {BASELINE} (no alembic_version, recognised from its schema " \
        f"version), schema version 2; `harness db upgrade`" in status.output
    assert _dump(Path(db)) == _dump(SCHEMA2_DB)  # status writes nothing
    first = runner.invoke(main, ["db", "upgrade", "--db", db])
    assert first.exit_code == 0, first.output
    assert (f"results database {db}: upgraded from revision {BASELINE} to {head_revision()}; backup "
            f"{db}.bak-{BASELINE}") in first.output
    second = runner.invoke(main, ["db", "upgrade", "--db", db])
    assert second.exit_code == 0 and f"at revision {head_revision()} (head), nothing to do" in second.output
    assert f"revision {head_revision()} (head), schema version {SCHEMA_VERSION}" in \
        runner.invoke(main, ["db", "status", "--db", db]).output
    new = runner.invoke(main, ["db", "upgrade", "--db", str(tmp_path / "new.db")])
    assert new.exit_code == 0 and f"created at revision {head_revision()}" in new.output


def test_a_store_at_an_unknown_revision_is_refused_unchanged(tmp_path):
    db = tmp_path / "newer.db"
    open_db(str(db)).dispose()
    with contextlib.closing(sqlite3.connect(db)) as connection, connection:
        connection.execute("UPDATE alembic_version SET version_num = 'ffff9999'")
    before = db.read_bytes()
    with pytest.raises(UsageError) as refused:
        open_db(str(db))
    assert str(refused.value) == (f"results database {db} is at migration ffff9999, which this harness "
                                  f"{__import__('harness').__version__} does not know (newest: {head_revision()}); "
                                  f"upgrade harness to open it")
    result = CliRunner().invoke(main, ["db", "upgrade", "--db", str(db)])
    assert result.exit_code == 1 and "is at migration ffff9999" in result.output
    assert db.read_bytes() == before
    with Session(create_engine(f"sqlite:///{db}", poolclass=NullPool)) as session:
        assert session.scalar(select(func.count()).select_from(Cell)) == 0
