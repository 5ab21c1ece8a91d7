"""The results store: SQLAlchemy 2.0 models for runs, cells, per-sample results and analyses.

``results.db`` (SQLite) by default; any SQLAlchemy URL (e.g. PostgreSQL) with ``--db``. Per-sample
results are written one transaction per batch, so an interrupted cell resumes where it stopped.
Analysis records (e.g. ``harness analyse fixed-randomness``) are rows of :class:`Analysis`, keyed by
a hash of their kind and configuration, with the provenance of the run that produced them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from typing import Any, Iterable, Mapping

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text,
                        UniqueConstraint, create_engine, delete, event, select)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

DEFAULT_DB = "results.db"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Run(Base):
    """One invocation of ``harness run``, with its provenance."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    status: Mapped[str] = mapped_column(String(16), default="running")
    command: Mapped[str] = mapped_column(Text, default="")
    git_commit: Mapped[str] = mapped_column(String(64), default="")
    git_dirty: Mapped[bool] = mapped_column(Boolean, default=False)
    harness_version: Mapped[str] = mapped_column(String(32), default="")
    packages: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    device: Mapped[str] = mapped_column(String(64), default="cpu")
    host: Mapped[str] = mapped_column(String(128), default="")
    cells: Mapped[list["Cell"]] = relationship(back_populates="run")
    analyses: Mapped[list["Analysis"]] = relationship(back_populates="run")


class Cell(Base):
    """One (defense, classifier, dataset, threat, eps, attack, protocol, n, seed) evaluation."""

    __tablename__ = "cells"
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    defense: Mapped[str] = mapped_column(String(128), index=True)
    defense_version: Mapped[str] = mapped_column(String(32))
    preset: Mapped[str] = mapped_column(String(64), default="")
    classifier: Mapped[str] = mapped_column(String(256))
    dataset: Mapped[str] = mapped_column(String(64), index=True)
    dataset_fingerprint: Mapped[str] = mapped_column(String(64))
    data_source: Mapped[str] = mapped_column(Text, default="")
    variant: Mapped[str] = mapped_column(String(128), default="clean")
    threat: Mapped[str] = mapped_column(String(8))
    eps: Mapped[float] = mapped_column(Float)
    eps_text: Mapped[str] = mapped_column(String(32))
    attack: Mapped[str] = mapped_column(String(64))
    attack_label: Mapped[str] = mapped_column(String(64))
    protocol: Mapped[str] = mapped_column(String(32), index=True)
    n: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="running")
    n_done: Mapped[int] = mapped_column(Integer, default=0)
    clean_acc: Mapped[float | None] = mapped_column(Float)
    robust_acc: Mapped[float | None] = mapped_column(Float)
    avg_acc: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    run: Mapped[Run | None] = relationship(back_populates="cells")
    samples: Mapped[list["SampleResult"]] = relationship(back_populates="cell", cascade="all, delete-orphan")


class SampleResult(Base):
    """The outcome for one test image in one cell."""

    __tablename__ = "samples"
    __table_args__ = (UniqueConstraint("cell_id", "index"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    cell_id: Mapped[int] = mapped_column(ForeignKey("cells.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)  # position in the dataset split
    label: Mapped[int] = mapped_column(Integer)
    clean_pred: Mapped[int] = mapped_column(Integer)
    adv_pred: Mapped[int] = mapped_column(Integer)
    perturbation: Mapped[float] = mapped_column(Float)  # norm of x_adv - x in the cell's threat model
    extra: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    cell: Mapped[Cell] = relationship(back_populates="samples")


class Analysis(Base):
    """One analysis record: its ``kind`` (e.g. ``fixed-randomness``), the ``config`` it was computed
    for (JSON), its ``result`` (JSON) and the run (provenance) that produced it. ``key`` hashes kind
    and config: computing the same analysis again replaces the record."""

    __tablename__ = "analyses"
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    result: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    run: Mapped[Run | None] = relationship(back_populates="analyses")


def open_db(url: str | None = None) -> Engine:
    """An engine for ``url`` (a SQLAlchemy URL or a file path); creates the tables if needed."""
    url = url or os.environ.get("HARNESS_DB") or DEFAULT_DB
    if "://" not in url:
        url = f"sqlite:///{url}"
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()
    Base.metadata.create_all(engine)
    return engine


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


def new_run(session: Session, command: str, provenance: Mapping[str, Any]) -> Run:
    """Add and commit a :class:`Run` from ``harness.provenance.code_provenance()``-style fields."""
    fields = ("git_commit", "git_dirty", "harness_version", "packages", "device", "host")
    run = Run(command=command, **{k: provenance[k] for k in fields if k in provenance})
    session.add(run)
    session.commit()
    return run


def analysis_key(kind: str, config: Mapping[str, Any]) -> str:
    """sha256 (hex) of the kind and the canonical JSON of ``config``."""
    text = json.dumps({"kind": kind, "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def save_analysis(session: Session, kind: str, config: Mapping[str, Any], result: Mapping[str, Any],
                  run_id: int | None = None) -> Analysis:
    """Store (insert or replace) the analysis of ``kind`` for ``config``, produced by run ``run_id``;
    commits."""
    config = json.loads(json.dumps(dict(config), default=str))
    result = json.loads(json.dumps(dict(result), default=str))
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
