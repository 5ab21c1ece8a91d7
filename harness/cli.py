"""The ``harness`` command line: run, report, list, show, train, data."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from harness.errors import UsageError

log = logging.getLogger("harness")


def _split_csv(values: tuple[str, ...]) -> tuple[str, ...]:
    """``--x a,b --x c`` -> ``("a", "b", "c")``."""
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


def parse_options(values: tuple[str, ...]) -> dict[str, Any]:
    from harness.attacks.factory import coerce_value

    options = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--option {item!r} must look like key=value")
        options[key.strip()] = coerce_value(value.strip())
    return options


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


_db_option = click.option("--db", default=None, help="Results database: a file path or SQLAlchemy URL "
                          "(default: $HARNESS_DB or ./results.db).")
_data_option = click.option("--data-root", default=None, help="Dataset folder (default: $HARNESS_DATA or "
                            "the user cache dir).")


@main.command()
@click.option("--defense", "defenses", multiple=True, required=True,
              help="Defense name(s); comma-separate or repeat for a grid (see `harness list`).")
@click.option("--dataset", default="cifar10", show_default=True, help="Dataset name.")
@click.option("--classifier", default=None, help="Base classifier: trained:<preset> (default trained:small), "
              "a .safetensors/.pt file, or robustbench:<name>.")
@click.option("--threat", default="linf", show_default=True, type=click.Choice(["linf", "l2"]))
@click.option("--eps", "eps", multiple=True, default=("8/255",), show_default=True,
              help="Radius as 8/255 or 0.0314; several for a grid.")
@click.option("--attack", "attacks", multiple=True, default=("pgd:steps=20",), show_default=True,
              help="pgd[:steps=N,step_size=S,eot=K,random_start=true], autoattack[:version=standard|rand], apgd-ce.")
@click.option("--protocol", "protocols", multiple=True, default=("non-adaptive,adaptive",), show_default=True,
              help="non-adaptive and/or adaptive (fixed randomness, exact gradients).")
@click.option("--n", default=512, show_default=True, help="Number of test images (the first n of a fixed permutation of the split).")
@click.option("--seed", "seeds", multiple=True, type=int, default=(0,), show_default=True,
              help="Evaluation seed(s): attack start and defense noise.")
@click.option("--variant", "variants", multiple=True, default=("clean",), show_default=True,
              help="Test-set variant(s): clean, colored (Reinhard colour shift), corrupt:<name>:<severity>.")
@click.option("--preset", default=None, help="Defense training preset (default: the entry's `small`).")
@click.option("--train-dataset", "train_datasets", multiple=True, default=("same",), show_default=True,
              help="Dataset(s) the purifiers are trained on, comma-separated; 'same' = --dataset. Another "
                   "dataset evaluates a transferred purifier (resized / channel-mapped to its input shape).")
@click.option("--train-classifier", default=None,
              help="Classifier the transferred purifiers are trained against (default: --classifier).")
@click.option("--option", "options", multiple=True, help="Defense option key=value (stored in the cell).")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--force", is_flag=True, help="Recompute cells that are already stored.")
@click.option("--no-train", is_flag=True, help="Refuse to train missing artifacts instead of training them.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@_db_option
@_data_option
def run(defenses, dataset, classifier, threat, eps, attacks, protocols, n, seeds, variants, preset,
        train_datasets, train_classifier, options, batch_size, force, no_train, no_progress, db,
        data_root) -> None:
    """Evaluate defenses; every (defense, eps, attack, protocol, seed) is a stored cell.

    Example: harness run --defense none,maep --dataset cifar10
    Transfer: harness run --defense maep --dataset fashion-mnist --train-dataset same,cifar10
    """
    from harness.attacks.factory import parse_attack_spec
    from harness.classifiers import DEFAULT_CLASSIFIER
    from harness.runner import RunRequest, run_grid
    from harness.store import open_db

    request = RunRequest(
        defenses=_split_csv(defenses), dataset=dataset, classifier=classifier or DEFAULT_CLASSIFIER,
        threat=threat, eps=_split_csv(eps), attacks=tuple(parse_attack_spec(a) for a in attacks),
        protocols=_split_csv(protocols), n=n, seeds=seeds, variants=_split_csv(variants), preset=preset,
        train_datasets=tuple(None if d == "same" else d for d in _split_csv(train_datasets)),
        train_classifier=train_classifier, options=parse_options(options),
        batch_size=batch_size, force=force, allow_train=not no_train, data_root=data_root,
        progress=not no_progress)
    outcomes = run_grid(request, open_db(db))
    click.echo(f"{'defense':<18} {'variant':<10} {'protocol':<13} {'attack':<18} {'eps':<8} {'seed':>4} "
               f"{'clean':>7} {'robust':>7}  status")
    for o in outcomes:
        name = o.defense + (f" <- {o.train_dataset}" if o.train_dataset else "")
        click.echo(f"{name:<18} {o.variant:<10} {o.protocol:<13} {o.attack:<18} {o.eps:<8} {o.seed:>4} "
                   f"{100 * o.clean_acc:7.2f} {100 * o.robust_acc:7.2f}  {o.status}")


@main.command()
@_db_option
@click.option("--out", default="leaderboards/out", show_default=True, type=click.Path(path_type=Path),
              help="Output folder for tables and the HTML leaderboard.")
@click.option("--format", "formats", multiple=True, default=("md,tex,csv,html",), show_default=True,
              help="Any of md, tex, csv, html.")
def report(db, out, formats) -> None:
    """Render Markdown/LaTeX/CSV tables and the HTML leaderboard from the results database."""
    from harness.report.writer import installed_reported, write_reports
    from harness.store import open_db

    for path in write_reports(open_db(db), out, formats=_split_csv(formats),
                              current_reported=installed_reported()):
        click.echo(str(path))


@main.command(name="list")
def list_defenses() -> None:
    """List the registered defenses (first-party and plugins)."""
    from harness.registry import default_registry

    click.echo(f"{'name':<18} {'kind':<11} {'stochastic':<10} {'datasets':<18} paper")
    for e in default_registry().entries():
        click.echo(f"{e.name:<18} {e.kind.value:<11} {str(e.stochastic).lower():<10} "
                   f"{','.join(e.datasets) or 'any':<18} {e.paper} ({e.citation})")


@main.command()
@_db_option
@click.option("--defense", default=None, help="Only this defense.")
def show(db, defense) -> None:
    """Show the stored cells."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from harness.store import Cell, open_db

    with Session(open_db(db)) as session:
        query = select(Cell).order_by(Cell.dataset, Cell.defense, Cell.protocol)
        if defense:
            query = query.where(Cell.defense == defense)
        for c in session.scalars(query):
            accs = "" if c.clean_acc is None else f"clean {100 * c.clean_acc:.2f} robust {100 * c.robust_acc:.2f}"
            click.echo(f"{c.key[:12]} {c.status:<8} {c.defense:<10} {c.dataset:<9} {c.protocol:<13} "
                       f"{c.attack_label:<16} {c.threat} {c.eps_text:<7} n={c.n_done}/{c.n} seed={c.seed} {accs}")


from harness.cli_train_data import analyse, data, train  # noqa: E402  (sub-groups live in their own module)

main.add_command(train)
main.add_command(data)
main.add_command(analyse)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
