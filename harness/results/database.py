"""Opening a results store: a file path or any SQLAlchemy URL, tables created on first use."""

from __future__ import annotations

import os

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine

from harness.results.queries import rekey_analyses
from harness.results.schema import Base

__all__ = ["DEFAULT_DB", "open_db"]

DEFAULT_DB = "results.db"


def open_db(url: str | None = None) -> Engine:
    """An engine for ``url`` (a SQLAlchemy URL or a file path; default ``$HARNESS_DB`` or
    ``./results.db``); creates the tables if needed."""
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
    rekey_analyses(engine)
    return engine
