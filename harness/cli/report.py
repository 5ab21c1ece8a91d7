"""``harness report`` (tables and the HTML leaderboard) and ``harness show`` (the stored cells)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from harness.cli.options import db_option, split_csv

__all__ = ["report", "show"]

#: where `harness report` renders the default database (results.db): the leaderboard the repository commits
PUBLISHED_OUT = Path("leaderboards")
#: where it renders any other store (git-ignored), so a scratch report never overwrites the published one
SCRATCH_OUT = Path("leaderboards/out")


@click.command()
@db_option
@click.option("--out", default=None, type=click.Path(path_type=Path),
              help=f"Output folder for tables and the HTML leaderboard (default: {PUBLISHED_OUT}, the published "
                   f"leaderboard, for the default database; {SCRATCH_OUT}, which git ignores, for any other --db).")
@click.option("--format", "formats", multiple=True, default=("md,tex,csv,html",), show_default=True,
              help="Any of md, tex, csv, html.")
@click.option("--templates", "templates", default=None, type=click.Path(path_type=Path, file_okay=False),
              help="Folder of Jinja2 templates that restyle the leaderboard (default: the ones shipped "
                   "with harness); a template missing there falls back to the shipped one.")
@click.option("--readme", default=None, type=click.Path(path_type=Path, dir_okay=False),
              help="Also rewrite this Markdown file's leaderboard block (the main table's top rows and a link "
                   "to the page), e.g. README.md.")
def report(db, out, formats, templates, readme) -> None:
    """Render Markdown/LaTeX/CSV tables and the HTML leaderboard from the results database.

    \b
    The published leaderboard:  harness report --readme README.md   (results.db -> leaderboards/)
    A scratch store:            harness report --db scratch.db       (-> leaderboards/out/)
    """
    from harness.report.writer import installed_entries, write_reports
    from harness.results.database import open_db

    if out is None:
        out = PUBLISHED_OUT if db is None and not os.environ.get("HARNESS_DB") else SCRATCH_OUT
    for path in write_reports(open_db(db), out, formats=split_csv(formats), installed=installed_entries(),
                              templates=templates, readme=readme):
        click.echo(str(path))


@click.command()
@db_option
@click.option("--defense", default=None, help="Only this defense.")
def show(db, defense) -> None:
    """Show the stored cells."""
    from sqlalchemy.orm import Session

    from harness.results.database import open_db
    from harness.results.queries import list_cells

    with Session(open_db(db)) as session:
        for c in list_cells(session, defense):
            accs = "" if c.clean_acc is None else f"clean {100 * c.clean_acc:.2f} robust {100 * c.robust_acc:.2f}"
            click.echo(f"{c.key[:12]} {c.status:<8} {c.defense:<10} {c.dataset:<9} {c.protocol:<13} "
                       f"{c.attack_label:<16} {c.threat} {c.eps_text:<7} n={c.n_done}/{c.n} seed={c.seed} {accs}")
