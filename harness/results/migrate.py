"""Bringing a results store to the current schema with the Alembic migrations of
:mod:`harness.results.migrations`, run programmatically (no ``alembic.ini``).

:func:`store_state` reads, never writes, what a store is: its Alembic revision (``alembic_version``), its
schema version (``store_info``), whether it holds any table of harness. A store without
``alembic_version`` is one of harness 0.2.0 or 0.1 (schema version 2 or none): it is recognised as the
baseline revision. :func:`check_state` refuses a store of a newer harness (a larger schema version, or a
revision this code does not know), before anything is written.

:func:`upgrade` then, in one transaction that holds the store's migration lock (``BEGIN IMMEDIATE`` on
SQLite, an advisory lock on PostgreSQL, so processes opening one store at once migrate it once): creates
an empty store at head (``create_all``, then stamps it), or copies a SQLite file aside
(``results.db.bak-<old revision>``), stamps a store of harness 0.2.0 with the baseline and upgrades it to
head. PostgreSQL's DDL is transactional: a failed upgrade leaves the store as it was.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from functools import lru_cache

# Alembic's own INFO lines (its plugins, one per revision) stay quiet unless asked for; harness logs one
# line per upgrade. Set before alembic is imported: it logs while importing.
if logging.getLogger("alembic").level == logging.NOTSET:
    logging.getLogger("alembic").setLevel(logging.WARNING)

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from sqlalchemy import String, Text, column, create_engine, event, inspect, select, table, text  # noqa: E402
from sqlalchemy.engine import Connection, Engine  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

from harness import __version__  # noqa: E402
from harness.core.errors import UsageError  # noqa: E402
from harness.results.schema import SCHEMA_VERSION, Base, StoreInfo  # noqa: E402

__all__ = ["MIGRATIONS", "SCHEMA_KEY", "StoreState", "Upgrade", "alembic_config", "head_revision", "store_state",
           "check_state", "upgrade", "backup_path", "sqlite_wal", "in_memory"]

log = logging.getLogger(__name__)
#: the Alembic script folder, inside the package
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SCHEMA_KEY = "schema_version"
VERSION_TABLE = "alembic_version"
#: the tables of harness: a database holding none of them is an empty store
HARNESS_TABLES = frozenset(Base.metadata.tables)
#: the key of PostgreSQL's advisory lock that serialises migrations of one database
ADVISORY_LOCK = zlib.crc32(b"harness.results.migrate")


def alembic_config(url: str | None = None, connection: Connection | None = None) -> Config:
    """An Alembic :class:`Config` for the package's migrations: on ``connection`` (used as it is, in its
    transaction), else on ``url``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@lru_cache(maxsize=1)
def _revisions() -> tuple[tuple[str, int], ...]:
    """``(revision, schema version it leaves the store at)``, oldest first (read once per process)."""
    scripts = ScriptDirectory.from_config(alembic_config())
    return tuple((script.revision, int(script.module.schema_version))
                 for script in reversed(list(scripts.walk_revisions())))


def head_revision() -> str:
    """The newest revision: the schema of :mod:`harness.results.schema`."""
    return _revisions()[-1][0]


def _baseline() -> str:
    return _revisions()[0][0]


def revision_for_schema(version: int | None) -> str:
    """The revision of a store stamped by no Alembic: the newest one at most at ``version`` (no version,
    harness 0.1, or older: the baseline)."""
    revisions = _revisions()
    found = [revision for revision, schema in revisions if version is not None and schema <= version]
    return found[-1] if found else revisions[0][0]


@dataclass(frozen=True)
class StoreState:
    """What a store is, as read from it."""

    tables: frozenset[str]
    revisions: tuple[str, ...]  # of alembic_version: none for a store that Alembic never stamped
    schema_version: str | None  # of store_info

    @property
    def empty(self) -> bool:
        return not (self.tables & HARNESS_TABLES)

    @property
    def stamped(self) -> bool:
        return bool(self.revisions)

    @property
    def revision(self) -> str | None:
        """The store's revision: stamped, or recognised from its schema version; None when empty."""
        if self.stamped:
            return self.revisions[0]
        if self.empty:
            return None
        schema = self.schema_version
        return revision_for_schema(int(schema) if schema is not None and schema.isdecimal() else None)

    @property
    def current(self) -> bool:
        """Stamped at head: nothing to do."""
        return self.revisions == (head_revision(),)


def store_state(connection: Connection) -> StoreState:
    """Read (never write) the state of the store on ``connection``."""
    tables = frozenset(inspect(connection).get_table_names())
    revisions: tuple[str, ...] = ()
    if VERSION_TABLE in tables:
        versions = table(VERSION_TABLE, column("version_num", String))
        revisions = tuple(connection.scalars(select(versions.c.version_num)))
    stored = None
    if StoreInfo.__tablename__ in tables:
        stored = connection.scalar(select(StoreInfo.value).where(StoreInfo.key == SCHEMA_KEY))
    return StoreState(tables, revisions, None if stored is None else str(stored))


def check_state(state: StoreState, shown: str) -> None:
    """A one-line :class:`UsageError` for a store this harness must not touch: not written by harness, or
    by a newer one."""
    stored = state.schema_version
    if stored is not None:
        if not stored.isdecimal():
            raise UsageError(f"results database {shown} has schema version {stored!r}, not a number: harness did "
                             f"not write it")
        if int(stored) > SCHEMA_VERSION:
            raise UsageError(f"results database {shown} has schema version {stored}, newer than this harness "
                             f"{__version__} reads (schema version {SCHEMA_VERSION}); upgrade harness to open it")
    known = {revision for revision, _ in _revisions()}
    unknown = [revision for revision in state.revisions if revision not in known]
    if unknown:
        raise UsageError(f"results database {shown} is at migration {unknown[0]}, which this harness "
                         f"{__version__} does not know (newest: {head_revision()}); upgrade harness to open it")
    if len(state.revisions) > 1:
        raise UsageError(f"results database {shown} is at several migrations ({', '.join(state.revisions)}); "
                         f"harness has one line of migrations: repair its {VERSION_TABLE} table")


@dataclass(frozen=True)
class Upgrade:
    """What :func:`upgrade` did: ``before`` (None for a new store) -> ``after``, and the backup copy."""

    before: str | None
    after: str
    backup: Path | None = None
    created: bool = False

    @property
    def changed(self) -> bool:
        return self.created or self.before != self.after

    def describe(self, shown: str) -> str:
        if self.created:
            return f"results database {shown}: created at revision {self.after} (schema version {SCHEMA_VERSION})"
        if not self.changed:
            return f"results database {shown}: at revision {self.after} (head), nothing to do"
        saved = f"; backup {self.backup}" if self.backup else ""
        return f"results database {shown}: upgraded from revision {self.before} to {self.after}{saved}"


def backup_path(database: Path, revision: str) -> Path:
    """Where the copy of ``database`` at ``revision`` goes: ``<file>.bak-<revision>``, or, when that exists
    (an earlier attempt left it: it is kept), ``<file>.bak-<revision>.1`` and so on."""
    path = database.with_name(f"{database.name}.bak-{revision}")
    number = 0
    while path.exists():
        number += 1
        path = database.with_name(f"{database.name}.bak-{revision}.{number}")
    return path


def _backup(database: Path, revision: str) -> Path:
    """A consistent copy of the SQLite ``database`` (SQLite's backup API: the committed state, WAL
    included), taken while the caller holds the write lock."""
    target = backup_path(database, revision)
    source = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
        copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, not a WAL database
    finally:
        source.close()
        copy.close()
    return target


def sqlite_wal(dbapi_connection: sqlite3.Connection, seconds: float = 30.0) -> None:
    """Switch the SQLite database of ``dbapi_connection`` to WAL (a no-op once it is). The switch needs
    the database alone for a moment, and SQLite gives up at once, without its busy timeout, when another
    connection holds the write lock (to avoid a deadlock): so it is tried again for up to ``seconds``."""
    deadline = time.monotonic() + seconds
    cursor = dbapi_connection.cursor()
    try:
        while True:
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        cursor.close()


def _migration_engine(engine: Engine) -> Engine:
    """An engine on ``engine``'s database whose transactions take the migration lock: on SQLite, every
    statement (DDL included) in one ``BEGIN IMMEDIATE`` transaction (SQLite's write lock, waited for up to
    30 s); elsewhere the engine's own transactions."""
    url = engine.url
    if engine.dialect.name != "sqlite":
        return create_engine(url, poolclass=NullPool)
    migrating = create_engine(url, poolclass=NullPool, connect_args={"timeout": 30})

    @event.listens_for(migrating, "connect")
    def _autocommit_driver(dbapi_connection, _record):  # pragma: no cover - trivial
        dbapi_connection.isolation_level = None  # the driver begins nothing itself: the event below does
        # WAL from the start (it persists in the file), before the lock: the stores' engines switch to it
        # too, and switching while another process holds the write lock fails
        sqlite_wal(dbapi_connection)

    @event.listens_for(migrating, "begin")
    def _begin_immediate(connection):  # pragma: no cover - trivial
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return migrating


def _lock(connection: Connection) -> None:
    """Take the migration lock in ``connection``'s transaction (SQLite took it with BEGIN IMMEDIATE)."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK})


def _record_schema_version(connection: Connection) -> None:
    info = table(StoreInfo.__tablename__, column("key", String), column("value", Text))
    connection.execute(info.delete().where(info.c.key == SCHEMA_KEY))
    connection.execute(info.insert().values(key=SCHEMA_KEY, value=str(SCHEMA_VERSION)))


def in_memory(engine: Engine) -> bool:
    """Whether ``engine`` is on an in-memory SQLite database (which only its own connections see)."""
    return engine.dialect.name == "sqlite" and engine.url.database in (None, "", ":memory:")


def upgrade(engine: Engine, shown: str) -> Upgrade:
    """Bring the store of ``engine`` to head (see the module's docstring); the store was checked by
    :func:`check_state` and is checked again under the lock. ``shown`` names it in messages. An
    in-memory SQLite database is migrated through ``engine`` itself (another engine would see another
    database)."""
    head = head_revision()
    own = not in_memory(engine)
    migrating = _migration_engine(engine) if own else engine
    backup: Path | None = None
    try:
        with migrating.connect() as connection:
            with connection.begin():
                _lock(connection)
                state = store_state(connection)  # again: another process may have migrated it meanwhile
                check_state(state, shown)
                if state.current:
                    return Upgrade(head, head)
                config = alembic_config(connection=connection)
                before = state.revision
                if before is None:  # empty: the tables as they are now, stamped
                    Base.metadata.create_all(connection)
                    _record_schema_version(connection)
                    command.stamp(config, head)
                else:
                    if own and engine.dialect.name == "sqlite":
                        backup = _backup(Path(str(engine.url.database)), before)
                    if not state.stamped and before != _baseline():
                        command.stamp(config, before)  # (the baseline itself is run: it adds missing tables)
                    command.upgrade(config, head)
    finally:
        if own:
            migrating.dispose()
    if before is None:
        log.info("created results database %s at revision %s", shown, head)
        return Upgrade(None, head, created=True)
    log.info("upgraded results database %s from revision %s to %s%s", shown, before, head,
             f" (backup: {backup})" if backup else "")
    return Upgrade(before, head, backup)
