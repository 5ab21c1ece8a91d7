"""``harness run``: evaluate a grid of cells, a thin layer over :func:`harness.api.evaluate`. Exit codes:
0 when every cell is stored, 1 when a cell failed (after the table), 128 + the signal (130 for Ctrl-C) when
interrupted."""

from __future__ import annotations

from typing import Any

import click
import pandas as pd

from harness.cli.options import data_option, db_option, option_values, parse_options, registry_help, split_csv

__all__ = ["run"]


@click.command()
@click.option("--defense", "defenses", multiple=True, required=True,
              help="Defense name(s); comma-separate or repeat for a grid (see `harness list`).")
@click.option("--dataset", default="cifar10", show_default=True, help=f"One of: {registry_help('dataset')} (see `harness data info`).")
@click.option("--classifier", default=None, help="Base classifier of purifier entries: trained:<preset> "
              "(default trained:small), a .safetensors/.pt file, or robustbench:<name>.")
@click.option("--threat", default="linf", show_default=True, type=click.Choice(["linf", "l2"]))
@click.option("--eps", "eps", multiple=True, default=("8/255",), show_default=True,
              help="Radius as 8/255 or 0.0314; several for a grid.")
@click.option("--attack", "attacks", multiple=True, default=("pgd:steps=20", "autoattack"), show_default=True,
              help=f"NAME[:key=value,...], one of: {registry_help('attack')} (see `harness list --attacks`).")
@click.option("--protocol", "protocols", multiple=True, default=("non-adaptive,adaptive",), show_default=True,
              help=f"Any of: {registry_help('protocol')} (see `harness list --protocols`).")
@click.option("--n", default=512, show_default=True,
              help="Number of test images (the first n of a fixed permutation of the split).")
@click.option("--seed", "seeds", multiple=True, type=int, default=(0,), show_default=True,
              help="Evaluation seed(s): attack start and defense noise.")
@click.option("--variant", "variants", multiple=True, default=("clean",), show_default=True,
              help=f"Test-set variant(s), kinds: {registry_help('variant')} (see `harness list --variants`).")
@click.option("--preset", default=None, help="Defense training preset (default: the entry's `small`).")
@click.option("--train-dataset", "train_datasets", multiple=True, default=("same",), show_default=True,
              help="Dataset(s) the purifiers are trained on, comma-separated; 'same' = --dataset. Another "
                   "dataset evaluates a transferred purifier (resized / channel-mapped to its input shape).")
@click.option("--train-classifier", default=None,
              help="Classifier the transferred purifiers are trained against (default: --classifier).")
@option_values
@click.option("--batch-size", default=128, show_default=True)
@click.option("--force", is_flag=True, help="Recompute cells that are already stored.")
@click.option("--no-train", is_flag=True, help="Refuse to train missing artifacts instead of training them.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@db_option
@data_option
def run(defenses, dataset, classifier, threat, eps, attacks, protocols, n, seeds, variants, preset,
        train_datasets, train_classifier, options, batch_size, force, no_train, no_progress, db,
        data_root) -> None:
    """Evaluate defenses; every (defense, eps, attack, protocol, seed) is a stored cell.

    \b
    Example:  harness run --defense none,maep --dataset cifar10
    Transfer: harness run --defense maep --dataset fashion-mnist --train-dataset same,cifar10
    """
    from harness.api import evaluate
    from harness.classifiers.sources import DEFAULT_CLASSIFIER
    from harness.evaluation.runner import Interrupted

    try:
        cells = evaluate(
            list(split_csv(defenses)), dataset=dataset, classifier=classifier or DEFAULT_CLASSIFIER, threat=threat,
            eps=split_csv(eps), attacks=list(attacks), protocols=split_csv(protocols), n=n, seeds=seeds,
            variants=split_csv(variants), preset=preset,
            train_datasets=tuple(None if d == "same" else d for d in split_csv(train_datasets)),
            train_classifier=train_classifier, options=parse_options(options), batch_size=batch_size, force=force,
            allow_train=not no_train, data_root=data_root, progress=not no_progress, db=db)
    except Interrupted as stop:
        click.echo(str(stop), err=True)
        raise click.exceptions.Exit(128 + stop.signum) from None
    _print_cells(cells)
    failed = [c for c in cells.itertuples() if c.status == "failed"]
    if failed:
        click.echo(f"{len(failed)} cell(s) failed: " + "; ".join(_failure(c) for c in failed), err=True)
        raise click.exceptions.Exit(1)


def _print_cells(cells: pd.DataFrame) -> None:
    click.echo(f"{'defense':<18} {'variant':<10} {'protocol':<13} {'attack':<18} {'eps':<8} {'seed':>4} "
               f"{'clean':>7} {'robust':>7}  status")
    for c in cells.itertuples():
        name = c.defense + (f" <- {c.train_dataset}" if c.train_dataset else "")
        also = [p for p in c.answers.split(",") if p and p != c.protocol]
        note = f"  (also {', '.join(also)}: no purifier)" if also else ""
        status = c.status + (f" ({c.note})" if c.note else "")
        click.echo(f"{name:<18} {c.variant:<10} {c.protocol:<13} {c.attack:<18} {c.eps:<8} {_text(c.seed):>4} "
                   f"{_percent(c.clean_acc):>7} {_percent(c.robust_acc):>7}  {status}{note}")


def _text(value: Any) -> str:
    return "-" if pd.isna(value) else str(value)


def _percent(value: Any) -> str:
    return "-" if pd.isna(value) else f"{100 * value:.2f}"


def _failure(cell: Any) -> str:
    """A failed cell, named by its axes, and its error."""
    variant = cell.variant if cell.variant != "clean" else ""
    axes = [variant, cell.protocol, cell.attack, f"eps={cell.eps}" if cell.eps else "", f"seed={_text(cell.seed)}"]
    named = " ".join([cell.defense] + [a for a in axes if a and a != "seed=-"])
    return f"{named}: {cell.error}"
