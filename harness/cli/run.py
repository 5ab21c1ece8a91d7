"""``harness run``: evaluate a grid of cells (``--defense`` and the grid options, or every grid of a
``--study``), a thin layer over :func:`harness.api.evaluate`. Exit codes: 0 when every cell is stored, 1
when a cell failed (after the table), 128 + the signal (130 for Ctrl-C) when interrupted."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import click
import pandas as pd

from harness.cli.options import batch_size_option, chosen_study, grid_options, grid_request

__all__ = ["run"]


@click.command()
@grid_options
@batch_size_option
@click.option("--force", is_flag=True, help="Recompute cells that are already stored.")
@click.option("--no-train", is_flag=True, help="Refuse to train missing artifacts instead of training them.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: in this process; ray: shards of samples as Ray tasks (pip install 'harness[ray]').")
@click.option("--address", default=None, help="The Ray cluster to join (--executor ray); default: a local Ray instance.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto (CUDA if available).")
def run(batch_size, force, no_train, no_progress, executor, address, device, **params: Any) -> None:
    """Evaluate defenses; every (defense, eps, attack, protocol, seed) is a stored cell.

    \b
    Example:  harness run --defense none,maep --dataset cifar10
    Transfer: harness run --defense maep --dataset fashion-mnist --train-dataset same,cifar10
    Study:    harness run --study maep-paper   (its grids, then its analyses; see `harness list --studies`)
    """
    from harness.evaluation.runner import Interrupted

    study = chosen_study(params)
    settings = dict(batch_size=batch_size, force=force, allow_train=not no_train, progress=not no_progress,
                    executor=executor, address=address, device=device)
    try:
        if study:
            cells = _run_study(study, params, settings)
        else:
            cells = _evaluate(grid_request(params, **settings), params["db"])
    except Interrupted as stop:
        click.echo(str(stop), err=True)
        raise click.exceptions.Exit(128 + stop.signum) from None
    _print_cells(cells)
    failed = [c for c in cells.itertuples() if c.status == "failed"]
    if failed:
        click.echo(f"{len(failed)} cell(s) failed: " + "; ".join(_failure(c) for c in failed), err=True)
        raise click.exceptions.Exit(1)


def _evaluate(request, db: str | None) -> pd.DataFrame:
    """One grid through :func:`harness.api.evaluate` (every field of the request passed on)."""
    from harness.api import evaluate

    kwargs = {f.name: getattr(request, f.name) for f in fields(request) if f.name != "defenses"}
    return evaluate(list(request.defenses), db=db, **kwargs)


def _run_study(name: str, params: dict[str, Any], settings: dict[str, Any]) -> pd.DataFrame:
    """Every grid of study ``name`` (stored cells skipped), then its analyses that are not stored yet."""
    from harness.analysis.studies import find_study, run_analyses, with_run_settings
    from harness.evaluation.runner import check_request
    from harness.results.database import open_db

    study = find_study(name, params["studies_dir"])
    settings = dict(settings, data_root=params["data_root"])
    requests = [with_run_settings(r, **settings) for r in study.requests()]
    for request in requests:  # bad input (a classifier that is gone, ...) fails before anything runs
        check_request(request)
    frames = [_evaluate(request, params["db"]) for request in requests]
    cells = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    for key in run_analyses(study, open_db(params["db"]), **settings):
        click.echo(f"analysis stored: {key}")
    return cells


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
