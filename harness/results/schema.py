"""The tables of the results store (SQLAlchemy 2.0): runs, cells, per-sample results and analyses.

The same tables on every back end: times are timezone-aware UTC (:class:`UTCDateTime`: ``TIMESTAMP WITH
TIME ZONE`` on PostgreSQL, UTC text on SQLite), documents are :data:`JSONDocument` (``JSONB`` on
PostgreSQL, ``JSON`` elsewhere). They are the head of the Alembic migrations in
:mod:`harness.results.migrations`: a change here needs a new revision there (and a bump of
:data:`SCHEMA_VERSION`).

Analysis records (e.g. ``harness analyse fixed-randomness``) are rows of :class:`Analysis`, keyed by a
hash of their kind and configuration, with the provenance of the run that produced them. A
:class:`Claim` says which process is computing a cell (its heartbeat expires the claim of a dead one);
:class:`StoreInfo` holds the schema version. Every query lives in :mod:`harness.results.queries`;
:mod:`harness.results.database` opens a store.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

#: the version of these tables; a store written by a newer harness has a larger one. 2: harness 0.2.0
#: (the Alembic baseline); 3: ``samples.sample_index``, aware UTC times, JSONB on PostgreSQL
SCHEMA_VERSION = 3


def utcnow() -> dt.datetime:
    """Now, timezone-aware, in UTC."""
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every back end. PostgreSQL stores ``TIMESTAMP WITH TIME ZONE``;
    SQLite, which has no time zones, stores the UTC wall time (so stored times compare as text in time
    order). A naive value written is taken to be UTC (stores before schema 3 held naive UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        value = (value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None
                 else value.astimezone(dt.timezone.utc))
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return (value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None
                else value.astimezone(dt.timezone.utc))


#: a JSON document column: ``JSONB`` on PostgreSQL (indexable, compact; object keys come back in JSONB's
#: order, not the order written), ``JSON`` on SQLite and elsewhere
JSONDocument = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    pass


class Run(Base):
    """One invocation of ``harness run``, with its provenance."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(16), default="running")
    command: Mapped[str] = mapped_column(Text, default="")
    git_commit: Mapped[str] = mapped_column(String(64), default="")
    git_dirty: Mapped[bool] = mapped_column(Boolean, default=False)
    harness_version: Mapped[str] = mapped_column(String(32), default="")
    packages: Mapped[dict[str, Any]] = mapped_column(JSONDocument, default=dict)
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
    config: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    status: Mapped[str] = mapped_column(String(16), default="running")
    n_done: Mapped[int] = mapped_column(Integer, default=0)
    clean_acc: Mapped[float | None] = mapped_column(Float)
    robust_acc: Mapped[float | None] = mapped_column(Float)
    avg_acc: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONDocument, default=dict)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    run: Mapped[Run | None] = relationship(back_populates="cells")
    samples: Mapped[list["SampleResult"]] = relationship(back_populates="cell", cascade="all, delete-orphan")


class SampleResult(Base):
    """The outcome for one test image in one cell."""

    __tablename__ = "samples"
    __table_args__ = (UniqueConstraint("cell_id", "sample_index", name="uq_samples_cell_id_sample_index"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    cell_id: Mapped[int] = mapped_column(ForeignKey("cells.id", ondelete="CASCADE"), index=True)
    sample_index: Mapped[int] = mapped_column(Integer)  # position in the dataset split
    label: Mapped[int] = mapped_column(Integer)
    clean_pred: Mapped[int] = mapped_column(Integer)
    adv_pred: Mapped[int] = mapped_column(Integer)
    perturbation: Mapped[float] = mapped_column(Float)  # norm of x_adv - x in the cell's threat model
    extra: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument)
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
    config: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    result: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    run: Mapped[Run | None] = relationship(back_populates="analyses")


class Claim(Base):
    """A cell being computed: by ``owner`` (host, pid and a random token), alive while ``heartbeat_at``
    is recent. A cell is claimed before it is computed, so two processes never compute it twice."""

    __tablename__ = "claims"
    cell_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    claimed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class StoreInfo(Base):
    """Facts about the store itself, e.g. ``schema_version`` (text values)."""

    __tablename__ = "store_info"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
