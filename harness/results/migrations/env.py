"""Alembic's environment for the results store, run by :mod:`harness.results.migrate`.

The caller hands over an open connection in ``config.attributes["connection"]``, already inside the
transaction (and holding the lock) the migration runs in; every revision then runs in that transaction.
Without one (Alembic's own command line with ``sqlalchemy.url`` set), a connection is opened here.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from harness.results.schema import Base

config = context.config


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if context.is_offline_mode():
    raise RuntimeError("the results store's migrations run on a database, not as SQL scripts (--sql)")
if connection is not None:
    _run(connection)
else:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection handed to the migrations, and no sqlalchemy.url")
    engine = create_engine(url)
    try:
        with engine.connect() as own:
            _run(own)
            own.commit()
    finally:
        engine.dispose()
