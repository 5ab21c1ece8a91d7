"""``harness submit`` (run a defense's cells and write a submission bundle) and ``harness merge`` (validate a
bundle, then insert it into a results database in one transaction)."""

from __future__ import annotations

from typing import Any

import click

from harness.cli.options import GRID_KEYWORDS, data_option, db_option, grid_options, grid_request

__all__ = ["submit", "merge"]


@click.command()
@grid_options
@click.option("--out", required=True, help="The bundle to write: a folder, or a file ending in .tar.gz.")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--no-train", is_flag=True, help="Refuse to train missing artifacts instead of training them.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def submit(out, batch_size, no_train, no_progress, **params: Any) -> None:
    """Run the cells a submission needs (harness run's grid options, or --study NAME's grids with this
    defense) into --db, then write a bundle of them: the entry's metadata, its plugin's distribution, its
    cells with per-sample results, their provenance and runs.

    \b
    Example:  harness submit --defense my-defense --study baselines --out my-defense.tar.gz
    """
    from harness.analysis.submissions import submission_requests, submit as submit_bundle
    from harness.core.entry import defense_registry
    from harness.core.errors import UsageError
    from harness.evaluation.runner import check_request
    from harness.results.database import open_db

    names = [n for value in params["defenses"] for n in value.split(",") if n.strip()]
    registry = defense_registry()
    if len(names) != 1:
        raise UsageError(f"give exactly one --defense to submit; valid: {', '.join(registry.names())}")
    defense = names[0].strip()
    registry.get(defense)  # a UsageError naming the valid ones
    settings = dict(batch_size=batch_size, allow_train=not no_train, progress=not no_progress)
    if params["study"]:
        from harness.analysis.studies import find_study, with_run_settings

        context = click.get_current_context()
        given = [name for name in GRID_KEYWORDS if name != "defenses"
                 and context.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]
        if given:
            raise UsageError(f"--study names its own grids: drop --{given[0].replace('_', '-')} (the grid options "
                             f"apply without --study)")
        study = find_study(params["study"], params["studies_dir"])
        requests = [with_run_settings(r, data_root=params["data_root"], **settings) for r in study.requests()]
    else:
        requests = [grid_request(params, **settings)]
    requests = submission_requests(defense, requests)
    for request in requests:  # bad input fails before anything runs or is stored
        check_request(request, registry)
    path, outcomes = submit_bundle(defense, requests, open_db(params["db"]), out, study=params["study"],
                                   registry=registry)
    keys = {o.key for o in outcomes}
    click.echo(f"bundle written: {path} ({len(keys)} cell(s) of {defense})")


@click.command()
@click.argument("bundle")
@click.option("--verify", "verify_cells", default=0, show_default=True,
              help="Recompute this many of the bundle's cells first; a disagreement rejects the bundle.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the choice of cells to verify.")
@click.option("--batch-size", default=128, show_default=True, help="Batch size of the verification.")
@db_option
@data_option
def merge(bundle, verify_cells, seed, batch_size, db, data_root) -> None:
    """Validate a submission bundle (keys, samples against accuracies, perturbations within eps, complete
    provenance, nothing overwritten) and insert it in one transaction; a rejected bundle writes nothing.

    \b
    Example:  harness merge my-defense.tar.gz --db results.db --verify 2
    """
    from harness.analysis.submissions import merge_bundle

    result = merge_bundle(bundle, db, verify=verify_cells, seed=seed, batch_size=batch_size, data_root=data_root)
    for check in result.verified:
        click.echo(check.line())
    click.echo(f"merged {result.cells} cell(s), {result.samples} sample(s), {result.runs} run(s)")
