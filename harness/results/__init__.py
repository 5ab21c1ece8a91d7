"""Results: ``schema`` (the SQLAlchemy tables: runs, cells, per-sample results, analyses),
``queries`` (every query of the store, in one place), ``provenance`` (where a number came from),
``database`` (opening a store: SQLite or PostgreSQL) and ``migrate`` with the Alembic ``migrations``
(upgrading a store in place).

Depends only on :mod:`harness.core`; the engine, the analyses and the reports read and write through it.
"""

from harness.results.database import DEFAULT_DB, open_db, upgrade_db
from harness.results.schema import Analysis, Cell, Run, SampleResult

__all__ = ["DEFAULT_DB", "open_db", "upgrade_db", "Analysis", "Cell", "Run", "SampleResult"]
