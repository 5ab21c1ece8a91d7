"""The ``harness`` command group: every subcommand, and one-line errors instead of tracebacks."""

from __future__ import annotations

import logging

import click

from harness.cli.analyse import analyse
from harness.cli.data import data
from harness.cli.db import db
from harness.cli.export import export
from harness.cli.listing import list_entries
from harness.cli.plan import plan
from harness.cli.report import report, show
from harness.cli.run import run
from harness.cli.submit import merge, submit
from harness.cli.train import train
from harness.cli.verify import verify
from harness.core.errors import UsageError

__all__ = ["main"]


class _Group(click.Group):
    """Prints :class:`UsageError` as a one-line error instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """harness: evaluate adversarial defenses of image classifiers under shared protocols, store every
    result in a database, and render paper-style tables and an HTML leaderboard."""
    level = logging.WARNING - 10 * verbose if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


for command in (run, plan, report, show, list_entries, train, data, analyse, db):
    main.add_command(command)

for command in (verify, submit, merge, export):  # issue 12: verification, submissions, exports
    main.add_command(command)
