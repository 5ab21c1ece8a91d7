"""Results: ``schema`` (the SQLAlchemy tables: runs, cells, per-sample results, analyses),
``queries`` (every query of the store, in one place) and ``provenance`` (where a number came from).

Depends only on :mod:`harness.core`; the engine, the analyses and the reports read and write through it.
"""

from harness.results.database import DEFAULT_DB, open_db
from harness.results.schema import Analysis, Cell, Run, SampleResult

__all__ = ["DEFAULT_DB", "open_db", "Analysis", "Cell", "Run", "SampleResult"]
