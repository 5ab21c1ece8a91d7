"""Opening a results store: a file path or any SQLAlchemy URL (SQLite by default; PostgreSQL through
``postgresql+psycopg://``, the optional extra ``harness[postgres]``).

A store records its schema version (``store_info``) and its Alembic revision (``alembic_version``). On
open, a store of a newer harness is refused before anything is written to it; an older one is upgraded
in place (a SQLite file is first copied to ``<file>.bak-<old revision>``), and a new one is created at
the newest revision (:mod:`harness.results.migrate`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from harness.core.errors import UsageError
from harness.core.registry import suggest
from harness.results.migrate import (StoreState, Upgrade, check_state, head_revision, in_memory, sqlite_wal,
                                     store_state, upgrade)
from harness.results.queries import rekey_analyses
from harness.results.schema import SCHEMA_VERSION, StoreInfo

__all__ = ["DEFAULT_DB", "open_db", "upgrade_db", "describe_db", "resolve_url", "shown_url"]

DEFAULT_DB = "results.db"
#: the dialects SQLAlchemy ships; others come with packages of their own
DIALECTS = ("sqlite", "postgresql", "mysql", "mariadb", "oracle", "mssql")
SCHEMA_KEY = "schema_version"
_FORMS = f"valid: a file path, or a SQLAlchemy URL ({', '.join(DIALECTS)}), e.g. sqlite:///results.db"
#: the PostgreSQL driver harness installs (``harness[postgres]``: psycopg 3)
POSTGRES_DRIVER = "psycopg"
POSTGRES_EXTRA = "pip install 'harness[postgres]'"


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def resolve_url(url: str | None = None) -> str:
    """The SQLAlchemy URL of ``url`` (default ``$HARNESS_DB`` or ``./results.db``): a file path becomes
    ``sqlite:///PATH``, and a bare ``postgresql://`` uses psycopg 3 (``postgresql+psycopg://``)."""
    url = url or os.environ.get("HARNESS_DB") or DEFAULT_DB
    if "://" not in url:
        return f"sqlite:///{url}"
    if url.startswith("postgresql://"):
        return f"postgresql+{POSTGRES_DRIVER}://" + url[len("postgresql://"):]
    return url


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _postgres_json(value: Any) -> str:
    """JSON for PostgreSQL, whose JSON types have no NaN nor Infinity: those are stored as null."""
    return json.dumps(_finite(value))


def _engine(url: str, **kwargs: Any) -> Engine:
    """``create_engine(url)``; a one-line UsageError for a URL that no installed dialect reads (or whose
    driver is missing), or a file path whose folder does not exist."""
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    if scheme == "postgresql":
        kwargs.setdefault("json_serializer", _postgres_json)
    try:
        engine = create_engine(url, **kwargs)
    except NoSuchModuleError:
        raise UsageError(f"unknown database URL scheme {scheme!r}{suggest(scheme, DIALECTS)}; {_FORMS}") from None
    except ArgumentError as exc:
        raise UsageError(f"cannot read the database URL ({_first_line(exc)}); {_FORMS}") from None
    except ImportError as exc:
        how = (f"install harness[postgres] ({POSTGRES_EXTRA}) and use postgresql+{POSTGRES_DRIVER}://"
               if scheme == "postgresql" else "install it, or give a file path")
        raise UsageError(f"the {scheme} database driver is not installed ({exc}); {how}") from None
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database not in (None, "", ":memory:"):
        path = Path(database)
        if path.is_dir():
            raise UsageError(f"results database {path} is a folder; give a file in it, e.g. {path / DEFAULT_DB}")
        if not path.parent.is_dir():
            raise UsageError(f"results database {path}: the folder {path.parent} does not exist; create it or "
                             f"give another path")
    return engine


def shown_url(engine: Engine) -> str:
    """How messages name the store: a SQLite file's path, another URL without its password."""
    if engine.dialect.name == "sqlite":
        return str(engine.url.database)
    return engine.url.render_as_string(hide_password=True)


def _unreachable(engine: Engine, exc: DBAPIError) -> UsageError:
    shown = shown_url(engine)
    if engine.dialect.name == "sqlite":
        return UsageError(f"cannot open results database {shown}: {_first_line(exc.orig)}; give a store harness "
                          f"wrote, or a path for a new one")
    return UsageError(f"cannot open results database {shown}: {_first_line(exc.orig)}; check that the server "
                      f"is running, the URL (user, password, database) and that the database exists")


def _read_store(url: str) -> tuple[Engine, str, StoreState]:
    """A probe engine on ``url`` (no pragmas: switching a refused store to WAL would change it), the
    store's name for messages, and its state read without writing; checked (:func:`check_state`). The
    caller disposes of the engine."""
    probe = _engine(url, poolclass=NullPool)
    shown = shown_url(probe)
    try:
        with probe.connect() as connection:
            state = store_state(connection)
        check_state(state, shown)
    except DBAPIError as exc:
        probe.dispose()
        raise _unreachable(probe, exc) from None
    except BaseException:
        probe.dispose()
        raise
    return probe, shown, state


def _check_and_upgrade(url: str) -> tuple[Upgrade, str]:
    """Refuse a store at ``url`` that is not one or is of a newer harness (nothing written), then bring it
    to the current schema (created, or upgraded after a backup); returns what was done and the store's
    name for messages."""
    probe, shown, state = _read_store(url)
    try:
        if state.current:
            return Upgrade(head_revision(), head_revision()), shown
        try:
            return upgrade(probe, shown), shown
        except DBAPIError as exc:
            raise UsageError(f"cannot upgrade results database {shown}: {_first_line(exc.orig)}") from None
    finally:
        probe.dispose()


def _record_version(engine: Engine) -> None:
    """Store ``SCHEMA_VERSION`` in a store whose ``store_info`` lacks it or has an older one."""
    with Session(engine) as session:
        row = session.get(StoreInfo, SCHEMA_KEY)
        if row is not None and row.value == str(SCHEMA_VERSION):
            return
        session.merge(StoreInfo(key=SCHEMA_KEY, value=str(SCHEMA_VERSION)))
        try:
            session.commit()
        except IntegrityError:  # another process recorded it first
            session.rollback()


def describe_db(url: str | None = None) -> str:
    """One line on the store at ``url``, read without writing anything (``harness db status``): its
    revision, its schema version and whether it is current."""
    probe, shown, state = _read_store(resolve_url(url))
    probe.dispose()
    head = head_revision()
    if state.empty:
        return f"results database {shown}: empty; opening it creates it at revision {head}"
    schema = state.schema_version or "none (harness 0.1)"
    if state.current:
        return f"results database {shown}: revision {head} (head), schema version {schema}"
    how = "stamped" if state.stamped else "no alembic_version, recognised from its schema version"
    return (f"results database {shown}: revision {state.revision} ({how}), schema version {schema}; "
            f"`harness db upgrade` (or opening it) upgrades it to {head}")


def upgrade_db(url: str | None = None) -> tuple[Upgrade, str]:
    """Bring the store at ``url`` (see :func:`resolve_url`) to the current schema, as :func:`open_db`
    does (``harness db upgrade``); returns what was done and how the store is named."""
    return _check_and_upgrade(resolve_url(url))


def open_db(url: str | None = None) -> Engine:
    """An engine for ``url`` (a SQLAlchemy URL or a file path; default ``$HARNESS_DB`` or
    ``./results.db``), its store at the current schema: created, or upgraded in place (a SQLite file
    copied aside first). A URL or file that is not a store, a server that cannot be reached, or a store of
    a newer harness is a one-line :class:`UsageError`, and the store is left as it was."""
    url = resolve_url(url)
    engine = _engine(url)
    if not in_memory(engine):
        engine.dispose()
        _check_and_upgrade(url)
        engine = _engine(url)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
            sqlite_wal(dbapi_conn)  # already WAL when harness created or upgraded the store
    if in_memory(engine):  # only this engine sees the database: created through it
        upgrade(engine, ":memory:")
    rekey_analyses(engine)
    _record_version(engine)
    return engine
