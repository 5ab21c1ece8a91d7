"""The Alembic migrations of the results store: ``env.py`` and one revision per schema version in
``versions/``. They run programmatically (no ``alembic.ini``), through :mod:`harness.results.migrate`:
``harness db upgrade``, and :func:`harness.results.open_db` on every open.

Revision ``0001`` is the baseline, schema version 2 (harness 0.2.0; it also completes a store of harness
0.1, which lacked ``claims`` and ``store_info``); every later revision is one step of
:data:`harness.results.schema.SCHEMA_VERSION` and records it in ``store_info`` in the same transaction.
Each revision module declares the ``schema_version`` it leaves the store at. A new revision starts from
``script.py.mako``: ``alembic.command.revision(harness.results.migrate.alembic_config(URL), "message")``.
"""
