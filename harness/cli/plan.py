"""``harness plan``: the cells a ``harness run`` with the same arguments would compute (or those of a
``--study``), whether each is stored, the artifacts it needs and its estimated cost. Nothing is built,
loaded or trained, and nothing is written (the results store is only read)."""

from __future__ import annotations

import json
from typing import Any

import click

from harness.cli.options import chosen_study, grid_options, grid_request

__all__ = ["plan"]


@click.command()
@grid_options
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "json"]),
              help="A table, or JSON (one spec per cell: key, done, artifacts, cost, config).")
def plan(fmt: str, **params: Any) -> None:
    """Show what `harness run` would compute for the same arguments: each cell's key and whether it is
    stored, the artifacts it needs (and whether each exists), and an estimated cost in network passes
    (attack steps x restarts x EOT, times the entry's NFE, times n).

    \b
    Example:  harness plan --defense none,maep --dataset cifar10
    Study:    harness plan --study maep-paper --format json
    """
    from harness.analysis.studies import find_study, plan_study
    from harness.evaluation.planning import plan_request

    study = chosen_study(params)
    if study:
        result = plan_study(find_study(study, params["studies_dir"]), params["db"], data_root=params["data_root"],
                            progress=False)
    else:
        result = plan_request(grid_request(params, progress=False), db=params["db"])
    if fmt == "json":
        click.echo(json.dumps(result.describe(), indent=2, sort_keys=True))
        return
    _print_plan(result)


def _passes(value: int | None) -> str:
    if value is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def _print_plan(result) -> None:
    click.echo(f"{'key':<32} {'defense':<18} {'variant':<10} {'protocol':<13} {'attack':<22} {'eps':<7} "
               f"{'seed':>4} {'n':>5} {'passes':>8}  status")
    for c in result.cells:
        name = c.defense + (f" <- {c.train_dataset}" if c.train_dataset else "")
        missing = [a.what for a in c.artifacts if a.exists is False]
        needs = f"  (needs {', '.join(missing)})" if missing and not c.done else ""
        click.echo(f"{c.key or '-':<32} {name:<18} {c.variant:<10} {c.protocol:<13} {c.attack:<22} {c.eps:<7} "
                   f"{c.seed:>4} {c.n:>5} {_passes(c.cost.get('network_passes')):>8}  {c.status}{needs}"
                   + (f"  [{c.note}]" if c.note else ""))
    artifacts = result.artifacts()
    if artifacts:
        click.echo("artifacts:")
        for a in artifacts:
            state = {True: "exists", False: "missing", None: "unknown"}[a.exists]
            click.echo(f"  {a.kind:<22} {a.key:<20} {state:<8} {a.what}")
    for problem in result.problems:
        click.echo(problem)
    t = result.totals()
    click.echo(f"{t['cells']} cell(s): {t['done']} done, {t['to_compute']} to compute "
               f"(~{_passes(t['network_passes_to_compute'])} network passes"
               + (f", {t['cells_without_estimate']} without an estimate" if t['cells_without_estimate'] else "")
               + f"); {t['artifacts_missing']} artifact(s) to train"
               + (f"; {t['unknown_keys']} cell(s) keyed only once built" if t['unknown_keys'] else ""))
