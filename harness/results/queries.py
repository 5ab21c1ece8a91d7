"""Every query of the results store, in one place: the engine, the analyses and the reports read and
write cells, samples, runs, claims and analysis records only through these functions.

They run on SQLite and PostgreSQL alike: a claim is one atomic ``INSERT ... ON CONFLICT DO NOTHING`` (the
cell key is its primary key) or one conditional ``UPDATE`` (PostgreSQL re-checks its ``WHERE`` on the row
it locks, SQLite holds the database's write lock), an analysis record is an upsert on its key, and a
write that meets a transient lock error (SQLite's "database is locked", PostgreSQL's deadlock and
serialization failures) is retried by :func:`retry_locked`."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any, Callable, Iterable, Mapping, TypeVar

from sqlalchemy import Table, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from harness.core.keys import content_hash
from harness.results.schema import Analysis, Cell, Claim, Run, SampleResult, utcnow

__all__ = ["find_cell", "done_indices", "reset_cell", "add_samples", "sample_outcomes", "finish_cell", "fail_cell",
           "claim_cell", "touch_claim", "refresh_claims", "release_claim", "retry_locked", "new_run",
           "finish_run", "list_cells", "cells_with_runs", "eot_sample_extras", "done_samples", "analysis_key",
           "save_analysis", "load_analyses", "rekey_analyses"]


# -- cells and samples ------------------------------------------------------------------------------
def find_cell(session: Session, key: str) -> Cell | None:
    """The cell ``key`` as stored now (reloaded: another process may have changed it)."""
    return session.scalar(select(Cell).where(Cell.key == key).execution_options(populate_existing=True))


def done_indices(session: Session, cell: Cell) -> set[int]:
    """The dataset indices of the samples of ``cell`` stored so far."""
    return set(session.scalars(select(SampleResult.sample_index).where(SampleResult.cell_id == cell.id)))


def reset_cell(session: Session, cell: Cell) -> None:
    """Forget a cell's samples and results (``--force``)."""
    session.execute(delete(SampleResult).where(SampleResult.cell_id == cell.id))
    cell.status, cell.n_done, cell.seconds, cell.error = "running", 0, 0.0, ""
    cell.clean_acc = cell.robust_acc = cell.avg_acc = None
    cell.metrics = {}


def add_samples(session: Session, cell: Cell, rows: Iterable[dict[str, Any]]) -> int:
    """Add the rows (:class:`SampleResult` fields, ``sample_index`` the dataset index) of ``cell`` whose
    index is not stored yet (re-adding one is a no-op); returns how many were added. Only the holder of
    the cell's claim writes its samples."""
    rows = list(rows)
    if not rows:
        return 0
    indices = [row["sample_index"] for row in rows]
    stored = set(session.scalars(select(SampleResult.sample_index).where(
        SampleResult.cell_id == cell.id, SampleResult.sample_index.between(min(indices), max(indices)))))
    new = [row for row in rows if row["sample_index"] not in stored]
    session.add_all(SampleResult(cell_id=cell.id, **row) for row in new)
    return len(new)


def sample_outcomes(session: Session, cell: Cell) -> list[tuple[int, int, int]]:
    """``(label, clean_pred, adv_pred)`` of every stored sample of ``cell``."""
    return [tuple(row) for row in session.execute(
        select(SampleResult.label, SampleResult.clean_pred, SampleResult.adv_pred)
        .where(SampleResult.cell_id == cell.id)).all()]


def finish_cell(session: Session, cell: Cell) -> None:
    """Compute a cell's accuracies from its samples (robust counts only clean-correct points), mark it
    done, drop its claim and commit: one transaction, so a process killed right after it leaves no claim
    on a finished cell."""
    rows = sample_outcomes(session, cell)
    clean_ok = [c == label for label, c, _ in rows]
    robust_ok = [ok and a == label for ok, (label, _, a) in zip(clean_ok, rows)]
    cell.clean_acc = sum(clean_ok) / len(rows)
    cell.robust_acc = sum(robust_ok) / len(rows)
    cell.avg_acc = (cell.clean_acc + cell.robust_acc) / 2
    cell.status, cell.finished_at, cell.n_done = "done", utcnow(), len(rows)
    session.execute(delete(Claim).where(Claim.cell_key == cell.key))
    session.commit()


def fail_cell(session: Session, cell: Cell, error: str) -> None:
    """Mark a cell failed with ``error`` (its stored samples are kept: a rerun retries it) and commit."""
    cell.status, cell.error, cell.finished_at = "failed", error, utcnow()
    session.commit()


def list_cells(session: Session, defense: str | None = None) -> list[Cell]:
    """The stored cells (``harness show``), by dataset, defense and protocol."""
    query = select(Cell).order_by(Cell.dataset, Cell.defense, Cell.protocol)
    if defense:
        query = query.where(Cell.defense == defense)
    return list(session.scalars(query))


def cells_with_runs(engine: Engine) -> list[tuple[Cell, Run | None]]:
    """Every cell with the run that last worked on it, in insertion order (detached, for reports)."""
    with Session(engine, expire_on_commit=False) as session:
        rows = session.execute(select(Cell, Run).outerjoin(Run, Cell.run_id == Run.id).order_by(Cell.id)).all()
        session.expunge_all()
        return [(cell, run) for cell, run in rows]


def eot_sample_extras(engine: Engine, protocol: str) -> list[tuple[str, int, int, dict | None]]:
    """``(cell key, label, clean_pred, extra)`` of every sample of the cells of ``protocol``."""
    with Session(engine) as session:
        return [tuple(row) for row in session.execute(
            select(Cell.key, SampleResult.label, SampleResult.clean_pred, SampleResult.extra)
            .join(SampleResult, SampleResult.cell_id == Cell.id).where(Cell.protocol == protocol)).all()]


def done_samples(engine: Engine) -> list[tuple[str, int, int, int, int, dict | None]]:
    """``(cell key, sample index, label, clean_pred, adv_pred, extra)`` of every sample of every finished
    cell."""
    with Session(engine) as session:
        return [tuple(row) for row in session.execute(
            select(Cell.key, SampleResult.sample_index, SampleResult.label, SampleResult.clean_pred,
                   SampleResult.adv_pred, SampleResult.extra)
            .join(SampleResult, SampleResult.cell_id == Cell.id).where(Cell.status == "done")).all()]


# -- runs -------------------------------------------------------------------------------------------
def new_run(session: Session, command: str, provenance: Mapping[str, Any]) -> Run:
    """Add and commit a :class:`Run` from :func:`harness.results.provenance.code_provenance` fields."""
    fields = ("git_commit", "git_dirty", "harness_version", "packages", "device", "host")
    run = Run(command=command, **{k: provenance[k] for k in fields if k in provenance})
    session.add(run)
    session.commit()
    return run


def finish_run(session: Session, run: Run, status: str) -> None:
    run.status, run.finished_at = status, utcnow()
    session.commit()


# -- claims (which process computes a cell) and lock retries -------------------------------------------
T = TypeVar("T")
#: how often a write that still finds the database locked after SQLite's busy timeout is tried
LOCK_ATTEMPTS = 3
#: PostgreSQL's SQLSTATEs of a transaction that may succeed when run again: serialization failure,
#: deadlock detected, lock not available
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03"})


def is_transient(exc: DBAPIError) -> bool:
    """Whether ``exc`` is a lock conflict that running the transaction again may resolve."""
    if "database is locked" in str(exc):  # SQLite, after its busy timeout
        return True
    orig = exc.orig
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return state in TRANSIENT_SQLSTATES


def retry_locked(session: Session, write: Callable[[], T], attempts: int = LOCK_ATTEMPTS) -> T:
    """``write()`` (which commits); rolled back and run again, up to ``attempts`` times, while the database
    reports a transient lock conflict (:func:`is_transient`). ``write`` must redo all of its changes (a
    rollback drops them)."""
    attempt = 1
    while True:
        try:
            return write()
        except DBAPIError as exc:
            if attempt >= attempts or isinstance(exc, IntegrityError) or not is_transient(exc):
                raise
            session.rollback()
            time.sleep(attempt)
            attempt += 1


def _insert_new(session: Session, table: Table, values: Mapping[str, Any], key: Iterable[str]) -> bool:
    """Insert ``values`` into ``table`` unless a row with the same ``key`` columns exists (another process
    may insert it at the same moment); True if this statement inserted it. Atomic: ``INSERT ... ON
    CONFLICT DO NOTHING`` on SQLite and PostgreSQL; elsewhere a plain insert in a savepoint, its conflict
    caught."""
    name = session.get_bind().dialect.name
    if name in ("sqlite", "postgresql"):
        dialect_insert = sqlite.insert if name == "sqlite" else postgresql.insert
        key = list(key)
        # RETURNING, not rowcount: drivers do not all report an INSERT's rowcount (psycopg 3 through
        # SQLAlchemy gives -1); a conflict returns no row
        statement = (dialect_insert(table).values(**values).on_conflict_do_nothing(index_elements=key)
                     .returning(*(table.c[column] for column in key)))
        return session.execute(statement).first() is not None
    try:
        with session.begin_nested():
            session.execute(insert(table).values(**values))
        return True
    except IntegrityError:
        return False


def _upsert(session: Session, table: Table, values: Mapping[str, Any], key: Iterable[str]) -> None:
    """Insert ``values`` into ``table``, or update the row with the same ``key`` columns to them: one
    atomic ``INSERT ... ON CONFLICT DO UPDATE`` on SQLite and PostgreSQL (an update, then an insert if
    it changed nothing, elsewhere)."""
    key = list(key)
    name = session.get_bind().dialect.name
    if name in ("sqlite", "postgresql"):
        dialect_insert = sqlite.insert if name == "sqlite" else postgresql.insert
        statement = dialect_insert(table).values(**values)
        changed = {column: statement.excluded[column] for column in values if column not in key}
        session.execute(statement.on_conflict_do_update(index_elements=key, set_=changed))
        return
    where = [table.c[column] == values[column] for column in key]
    if session.execute(update(table).where(*where).values(**values)).rowcount == 0:
        session.execute(insert(table).values(**values))


def claim_cell(engine: Engine, key: str, owner: str, timeout: float) -> bool:
    """Claim cell ``key`` for ``owner``; True if ``owner`` holds the claim now. The insert is atomic (the
    cell key is the claim's primary key). A claim whose heartbeat is older than ``timeout`` seconds
    belongs to a dead process: it is taken over, and the run that last worked on the cell, if still
    ``running``, is marked ``abandoned``."""
    with Session(engine) as session:
        return retry_locked(session, lambda: _claim(session, key, owner, timeout))


def _claim(session: Session, key: str, owner: str, timeout: float) -> bool:
    now = utcnow()
    expired = now - dt.timedelta(seconds=timeout)
    heartbeat = session.scalar(select(Claim.heartbeat_at).where(Claim.cell_key == key))
    if heartbeat is None:  # not claimed: insert the claim, unless another process does at this very moment
        inserted = _insert_new(session, Claim.__table__,
                               dict(cell_key=key, owner=owner, claimed_at=now, heartbeat_at=now), ["cell_key"])
        session.commit()
        return inserted
    if heartbeat >= expired:
        return False
    # expired: take it over, unless its owner beats (or another process takes it) first; the UPDATE's
    # condition is checked on the row as it is when the UPDATE locks it
    taken = session.execute(update(Claim).where(Claim.cell_key == key, Claim.heartbeat_at < expired)
                            .values(owner=owner, claimed_at=now, heartbeat_at=now)
                            .execution_options(synchronize_session=False)).rowcount == 1
    if taken:
        last_run = select(Cell.run_id).where(Cell.key == key).scalar_subquery()
        session.execute(update(Run).where(Run.id == last_run, Run.status == "running")
                        .values(status="abandoned", finished_at=now).execution_options(synchronize_session=False))
    session.commit()
    return taken


def touch_claim(session: Session, key: str, owner: str) -> bool:
    """Refresh ``owner``'s heartbeat on cell ``key`` in the session's transaction (no commit); False if
    the claim is no longer ``owner``'s (it expired and was taken over)."""
    return session.execute(update(Claim).where(Claim.cell_key == key, Claim.owner == owner)
                           .values(heartbeat_at=utcnow()).execution_options(synchronize_session=False)
                           ).rowcount == 1


def refresh_claims(engine: Engine, owner: str) -> None:
    """Refresh the heartbeat of every claim of ``owner``."""
    with Session(engine) as session:
        def write() -> None:
            session.execute(update(Claim).where(Claim.owner == owner).values(heartbeat_at=utcnow())
                            .execution_options(synchronize_session=False))
            session.commit()

        retry_locked(session, write)


def release_claim(engine: Engine, key: str, owner: str) -> None:
    """Delete ``owner``'s claim on cell ``key`` (the cell is done, failed or interrupted)."""
    with Session(engine) as session:
        def write() -> None:
            session.execute(delete(Claim).where(Claim.cell_key == key, Claim.owner == owner))
            session.commit()

        retry_locked(session, write)


# -- analyses ---------------------------------------------------------------------------------------
def analysis_key(kind: str, config: Mapping[str, Any]) -> str:
    """The key of an analysis record: the canonical-JSON hash of its kind and config."""
    return content_hash({"kind": kind, "config": config})


def _plain(value: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(value), default=str))


def save_analysis(session: Session, kind: str, config: Mapping[str, Any], result: Mapping[str, Any],
                  run_id: int | None = None) -> Analysis:
    """Store (insert or replace) the analysis of ``kind`` for ``config``, produced by run ``run_id``;
    commits."""
    config, result = _plain(config), _plain(result)
    key = analysis_key(kind, config)
    _upsert(session, Analysis.__table__, dict(key=key, kind=kind, config=config, result=result,
                                              created_at=utcnow(), run_id=run_id), ["key"])
    session.commit()
    return session.scalar(select(Analysis).where(Analysis.key == key).execution_options(populate_existing=True))


def load_analyses(session: Session, kind: str) -> list[Analysis]:
    """Every stored analysis of ``kind``, oldest first."""
    return list(session.scalars(select(Analysis).where(Analysis.kind == kind).order_by(Analysis.id)))


def rekey_analyses(engine: Engine) -> int:
    """Give analysis records written by harness 0.1 (whose keys hashed JSON with spaces) the canonical
    key; returns how many changed. The records themselves are untouched."""
    with Session(engine) as session:
        changed = 0
        for row in session.scalars(select(Analysis)):
            key = analysis_key(row.kind, row.config)
            if row.key != key:
                row.key, changed = key, changed + 1
        session.commit()
        return changed
