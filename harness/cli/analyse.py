"""``harness analyse ...``: analyses beyond accuracy, stored in the results DB."""

from __future__ import annotations

import click

from harness.cli.options import data_option, db_option, option_values, parse_options

__all__ = ["analyse"]


@click.group()
def analyse() -> None:
    """Analyses beyond accuracy; their results appear in `harness report`."""


@analyse.command(name="fixed-randomness")
@click.option("--defense", required=True, help="A (stochastic) purifier entry.")
@click.option("--dataset", default="cifar10", show_default=True)
@click.option("--classifier", default="trained:small", show_default=True)
@click.option("--preset", default=None)
@option_values
@click.option("--n", default=32, show_default=True, help="Test images (the same subset a cell uses).")
@click.option("--seed", default=0, show_default=True)
@click.option("--eps", default="8/255", show_default=True)
@click.option("--steps", default=20, show_default=True, help="PGD steps of the fixed-randomness attack.")
@db_option
@data_option
def analyse_fixed_randomness(defense, dataset, classifier, preset, options, n, seed, eps, steps, db,
                             data_root) -> None:
    """Distances to the clean image, spread across seeds vs inputs, and compression rates (Liu & Wei,
    arXiv 2505.22839), with the purifier's noise fixed per sample; stored in the results DB (prints
    the record's key)."""
    from harness.analysis.study import StudyRequest, run_study
    from harness.results.database import open_db

    request = StudyRequest(defense=defense, dataset=dataset, classifier=classifier, preset=preset,
                           options=parse_options(options), n=n, seed=seed, eps=eps,
                           attack={"name": "pgd", "steps": steps}, data_root=data_root)
    click.echo(run_study(request, open_db(db)))
