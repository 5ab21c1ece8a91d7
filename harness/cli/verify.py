"""``harness verify``: recompute stored cells from their configs and compare them per sample. Exit codes: 0
when every verified cell agrees, 1 when one disagrees or could not be recomputed."""

from __future__ import annotations

import json

import click

from harness.cli.options import data_option, db_option, split_csv

__all__ = ["verify"]


@click.command()
@click.option("--cells", default=2, show_default=True, help="How many finished cells to choose at random.")
@click.option("--samples", default=None, type=int,
              help="Recompute only this many random samples of each cell (with the evaluation batches that "
                   "hold them); default: every sample.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random choices.")
@click.option("--key", "keys", multiple=True, help="Verify this cell (repeatable) instead of random ones.")
@click.option("--defense", "defenses", multiple=True,
              help="Choose the random cells among this defense's (repeatable or comma-separated).")
@click.option("--batch-size", default=128, show_default=True,
              help="The batch size the cells were computed with (harness run's --batch-size).")
@click.option("--no-train", is_flag=True, help="Refuse to train missing weights instead of training them.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@db_option
@data_option
def verify(cells, samples, seed, keys, defenses, batch_size, no_train, fmt, db, data_root) -> None:
    """Recompute stored cells (in a scratch store; the results DB is only read) and report per-sample
    agreement and whether the weights' fingerprint matched.

    \b
    Example:  harness verify --cells 2 --samples 64 [--defense none]
    """
    from harness.evaluation.verify import verify_store

    checks = verify_store(db, cells=cells, samples=samples, seed=seed, keys=keys, batch_size=batch_size,
                          allow_train=not no_train, data_root=data_root, defenses=split_csv(defenses))
    failed = [c for c in checks if not c.agrees]
    if fmt == "json":
        click.echo(json.dumps([c.describe() for c in checks], indent=2, sort_keys=True))
    else:
        for check in checks:
            click.echo(check.line())
        click.echo(f"{len(checks) - len(failed)} of {len(checks)} cell(s) verified"
                   + (f"; {len(failed)} disagree or could not be recomputed" if failed else ": all agree"))
    if failed:
        raise click.exceptions.Exit(1)
