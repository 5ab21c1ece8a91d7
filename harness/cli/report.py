"""``harness report`` (tables and the HTML leaderboard) and ``harness show`` (the stored cells)."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli.options import db_option, split_csv

__all__ = ["report", "show"]


@click.command()
@db_option
@click.option("--out", default="leaderboards/out", show_default=True, type=click.Path(path_type=Path),
              help="Output folder for tables and the HTML leaderboard.")
@click.option("--format", "formats", multiple=True, default=("md,tex,csv,html",), show_default=True,
              help="Any of md, tex, csv, html.")
@click.option("--templates", "templates", default=None, type=click.Path(path_type=Path, file_okay=False),
              help="Folder of Jinja2 templates that restyle the leaderboard (default: the ones shipped "
                   "with harness); a template missing there falls back to the shipped one.")
def report(db, out, formats, templates) -> None:
    """Render Markdown/LaTeX/CSV tables and the HTML leaderboard from the results database."""
    from harness.report.writer import installed_entries, write_reports
    from harness.results.database import open_db

    for path in write_reports(open_db(db), out, formats=split_csv(formats), installed=installed_entries(),
                              templates=templates):
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
