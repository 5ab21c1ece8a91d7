"""``harness export``: the results store as RobustBench-style model cards, or as CSV / Parquet tables."""

from __future__ import annotations

import click

from harness.cli.options import db_option

__all__ = ["export"]


@click.command()
@click.option("--format", "fmt", required=True, type=click.Choice(["robustbench", "csv", "parquet"]),
              help="robustbench: model_info/<dataset>/<Linf|L2>/<name>.json for the deterministic entries; "
                   "csv / parquet: cells and per-sample results.")
@click.option("--out", default="export", show_default=True, help="Folder to write into.")
@db_option
def export(fmt, out, db) -> None:
    """Export the results database for other tools.

    \b
    Example:  harness export --format robustbench --out leaderboards/export
    """
    from harness.evaluation.verify import read_only_engine
    from harness.report.export import export as export_store

    engine = read_only_engine(db)
    try:
        paths = export_store(engine, fmt, out)
    finally:
        engine.dispose()
    for path in paths:
        click.echo(str(path))
    click.echo(f"{len(paths)} file(s) written to {out}")
