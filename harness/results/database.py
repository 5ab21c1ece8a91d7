"""Opening a results store: a file path or any SQLAlchemy URL, tables created on first use.

A store records the schema version of the harness that wrote it (``store_info``); a store of a newer
harness is refused, before anything is written to it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from sqlalchemy import create_engine, event, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError
from sqlalchemy.orm import Session

from harness import __version__
from harness.core.errors import UsageError
from harness.core.registry import suggest
from harness.results.queries import rekey_analyses
from harness.results.schema import SCHEMA_VERSION, Base, StoreInfo

__all__ = ["DEFAULT_DB", "open_db"]

DEFAULT_DB = "results.db"
#: the dialects SQLAlchemy ships; others come with packages of their own
DIALECTS = ("sqlite", "postgresql", "mysql", "mariadb", "oracle", "mssql")
SCHEMA_KEY = "schema_version"
_FORMS = f"valid: a file path, or a SQLAlchemy URL ({', '.join(DIALECTS)}), e.g. sqlite:///results.db"


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _engine(url: str) -> Engine:
    """``create_engine(url)``; a one-line UsageError for a URL that no installed dialect reads, or a
    file path whose folder does not exist."""
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    try:
        engine = create_engine(url, future=True)
    except NoSuchModuleError:
        raise UsageError(f"unknown database URL scheme {scheme!r}{suggest(scheme, DIALECTS)}; {_FORMS}") from None
    except ArgumentError as exc:
        raise UsageError(f"cannot read the database URL ({_first_line(exc)}); {_FORMS}") from None
    except ImportError as exc:
        raise UsageError(f"the {scheme} database driver is not installed ({exc}); install it, or give a "
                         f"file path") from None
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database not in (None, "", ":memory:"):
        path = Path(database)
        if path.is_dir():
            raise UsageError(f"results database {path} is a folder; give a file in it, e.g. {path / DEFAULT_DB}")
        if not path.parent.is_dir():
            raise UsageError(f"results database {path}: the folder {path.parent} does not exist; create it or "
                             f"give another path")
    return engine


def _check_store(url: str) -> None:
    """Read, never write, the store at ``url``: refuse one that is not a database, or of a newer schema."""
    probe = _engine(url)  # no pragmas: switching a refused store to WAL would change it
    shown = probe.url.database if probe.dialect.name == "sqlite" else probe.url.render_as_string(hide_password=True)
    try:
        with probe.connect() as connection:
            stored = (connection.scalar(select(StoreInfo.value).where(StoreInfo.key == SCHEMA_KEY))
                      if inspect(connection).has_table(StoreInfo.__tablename__) else None)
    except DBAPIError as exc:
        raise UsageError(f"cannot open results database {shown}: {_first_line(exc.orig)}; give a store harness "
                         f"wrote, or a path for a new one") from None
    finally:
        probe.dispose()
    if stored is None:  # a new store, or one of harness 0.1
        return
    stored = str(stored)
    if not stored.isdecimal():
        raise UsageError(f"results database {shown} has schema version {stored!r}, not a number: harness did "
                         f"not write it")
    if int(stored) > SCHEMA_VERSION:
        raise UsageError(f"results database {shown} has schema version {stored}, newer than this harness "
                         f"{__version__} reads (schema version {SCHEMA_VERSION}); upgrade harness to open it")


def _record_version(engine: Engine) -> None:
    """Store ``SCHEMA_VERSION`` in a store that lacks it (harness 0.1, or a new one) or has an older one."""
    with Session(engine) as session:
        row = session.get(StoreInfo, SCHEMA_KEY)
        if row is not None and row.value == str(SCHEMA_VERSION):
            return
        session.merge(StoreInfo(key=SCHEMA_KEY, value=str(SCHEMA_VERSION)))
        try:
            session.commit()
        except IntegrityError:  # another process recorded it first
            session.rollback()


def _create_tables(engine: Engine, attempts: int = 5) -> None:
    """Create the missing tables; when processes opening a new store at once race to create one (it
    "already exists"), try again: the next check finds it."""
    for attempt in range(1, attempts + 1):
        try:
            Base.metadata.create_all(engine)
            return
        except DBAPIError:
            if attempt == attempts:
                raise
            time.sleep(0.1 * attempt)


def open_db(url: str | None = None) -> Engine:
    """An engine for ``url`` (a SQLAlchemy URL or a file path; default ``$HARNESS_DB`` or
    ``./results.db``); creates the tables if needed. A URL or file that is not a store, or a store of a
    newer harness, is a one-line :class:`UsageError`, and the store is left as it was."""
    url = url or os.environ.get("HARNESS_DB") or DEFAULT_DB
    if "://" not in url:
        url = f"sqlite:///{url}"
    _check_store(url)
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA busy_timeout=30000")  # first: switching to WAL waits for other writers too
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()
    _create_tables(engine)
    rekey_analyses(engine)
    _record_version(engine)
    return engine
