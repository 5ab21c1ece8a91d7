"""Every query of the results store, in one place: the engine, the analyses and the reports read and
write cells, samples, runs and analysis records only through these functions."""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from sqlalchemy import delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from harness.core.keys import content_hash
from harness.results.schema import Analysis, Cell, Run, SampleResult, utcnow

__all__ = ["find_cell", "done_indices", "reset_cell", "add_samples", "sample_outcomes", "finish_cell", "new_run",
           "finish_run", "list_cells", "cells_with_runs", "eot_sample_extras", "done_samples", "analysis_key",
           "save_analysis", "load_analyses", "rekey_analyses"]


# -- cells and samples ------------------------------------------------------------------------------
def find_cell(session: Session, key: str) -> Cell | None:
    return session.scalar(select(Cell).where(Cell.key == key))


def done_indices(session: Session, cell: Cell) -> set[int]:
    return set(session.scalars(select(SampleResult.index).where(SampleResult.cell_id == cell.id)))


def reset_cell(session: Session, cell: Cell) -> None:
    """Forget a cell's samples and results (``--force``)."""
    session.execute(delete(SampleResult).where(SampleResult.cell_id == cell.id))
    cell.status, cell.n_done, cell.seconds, cell.error = "running", 0, 0.0, ""
    cell.clean_acc = cell.robust_acc = cell.avg_acc = None
    cell.metrics = {}


def add_samples(session: Session, cell: Cell, rows: Iterable[dict[str, Any]]) -> None:
    session.add_all(SampleResult(cell_id=cell.id, **row) for row in rows)


def sample_outcomes(session: Session, cell: Cell) -> list[tuple[int, int, int]]:
    """``(label, clean_pred, adv_pred)`` of every stored sample of ``cell``."""
    return [tuple(row) for row in session.execute(
        select(SampleResult.label, SampleResult.clean_pred, SampleResult.adv_pred)
        .where(SampleResult.cell_id == cell.id)).all()]


def finish_cell(session: Session, cell: Cell) -> None:
    """Compute a cell's accuracies from its samples (robust counts only clean-correct points), mark it
    done and commit."""
    rows = sample_outcomes(session, cell)
    clean_ok = [c == label for label, c, _ in rows]
    robust_ok = [ok and a == label for ok, (label, _, a) in zip(clean_ok, rows)]
    cell.clean_acc = sum(clean_ok) / len(rows)
    cell.robust_acc = sum(robust_ok) / len(rows)
    cell.avg_acc = (cell.clean_acc + cell.robust_acc) / 2
    cell.status, cell.finished_at, cell.n_done = "done", utcnow(), len(rows)
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


def done_samples(engine: Engine) -> list[tuple[str, int, int, int, int]]:
    """``(cell key, index, label, clean_pred, adv_pred)`` of every sample of every finished cell."""
    with Session(engine) as session:
        return [tuple(row) for row in session.execute(
            select(Cell.key, SampleResult.index, SampleResult.label, SampleResult.clean_pred, SampleResult.adv_pred)
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
    row = session.scalar(select(Analysis).where(Analysis.key == key))
    if row is None:
        row = Analysis(key=key, kind=kind, config=config, result=result)
        session.add(row)
    row.result, row.created_at, row.run_id = result, utcnow(), run_id
    session.commit()
    return row


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
