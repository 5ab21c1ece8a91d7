"""``harness db ...``: the results store itself: its schema revision, and upgrading it."""

from __future__ import annotations

import click

from harness.cli.options import db_option

__all__ = ["db"]


@click.group()
def db() -> None:
    """The results database: its schema revision (Alembic migrations), and upgrading it in place."""


@db.command(name="upgrade")
@db_option
def db_upgrade(db) -> None:
    """Upgrade the results database to this harness's schema (done on every open as well). A SQLite file
    is first copied to FILE.bak-<old revision>; a new database is created at the newest revision."""
    from harness.results.database import upgrade_db

    done, shown = upgrade_db(db)
    click.echo(done.describe(shown))


@db.command(name="status")
@db_option
def db_status(db) -> None:
    """Show the results database's revision and schema version, writing nothing."""
    from harness.results.database import describe_db

    click.echo(describe_db(db))
