"""Option definitions and parsing shared by every command (one definition each, so commands cannot drift)."""

from __future__ import annotations

from typing import Any, Callable

import click

from harness.core.errors import UsageError

__all__ = ["db_option", "data_option", "option_values", "grid_options", "grid_request", "study_options",
           "chosen_study", "split_csv", "parse_options", "registry_help", "batch_size_option"]

db_option = click.option("--db", default=None, help="Results database: a file path or SQLAlchemy URL "
                         "(default: $HARNESS_DB or ./results.db).")
data_option = click.option("--data-root", default=None, help="Dataset folder (default: $HARNESS_DATA or "
                           "the user cache dir).")
option_values = click.option("--option", "options", multiple=True,
                             help="Defense option key=value (see `harness list --defense NAME`); stored in the cell.")


class _BatchSize(click.ParamType):
    """A whole number >= 1, or ``auto`` (the largest batch that fits the device's memory)."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int):
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is not a whole number >= 1 or auto", param, ctx)


batch_size_option = click.option(
    "--batch-size", type=_BatchSize(), default=128, show_default=True,
    help="Images per batch, or auto: the largest that fits the device's memory (measured per sample). Not part "
         "of a cell's key; AutoAttack's per-sample results depend on it (the library's random starts are drawn "
         "per batch).")


def split_csv(values: tuple[str, ...]) -> tuple[str, ...]:
    """``--x a,b --x c`` -> ``("a", "b", "c")``."""
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


def parse_options(values: tuple[str, ...]) -> dict[str, Any]:
    """``("tstar=0.2", "sampler=ddim")`` -> ``{"tstar": 0.2, "sampler": "ddim"}``."""
    from harness.attacks.catalog import coerce_value

    options = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option {item!r} must look like key=value")
        options[key.strip()] = coerce_value(value.strip())
    return options


def registry_help(axis: str) -> str:
    """The names of a registry, for an option's help text (so help never falls behind the code)."""
    from harness.attacks.catalog import attack_registry
    from harness.data.catalog import dataset_names
    from harness.data.variants import variant_registry
    from harness.evaluation.protocols import protocol_registry

    if axis == "dataset":
        return ", ".join(dataset_names())
    registries = {"attack": attack_registry, "protocol": protocol_registry, "variant": variant_registry}
    return ", ".join(registries[axis]().names())


def grid_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options that describe a grid of cells, shared by ``harness run`` and ``harness plan`` (so a plan
    is asked for with exactly the arguments of the run it plans): ``--defense`` ... ``--option``, ``--db``
    and ``--data-root``, plus ``--study``/``--studies``. They reach the command as keyword arguments;
    :func:`grid_request` turns them into a :class:`~harness.evaluation.runner.RunRequest`."""
    from harness.evaluation.precision import AUTOCAST

    decorators = [
        click.option("--defense", "defenses", multiple=True,
                     help="Defense name(s); comma-separate or repeat for a grid (see `harness list`)."),
        click.option("--dataset", default="cifar10", show_default=True,
                     help=f"One of: {registry_help('dataset')} (see `harness data info`)."),
        click.option("--classifier", default=None, help="Base classifier of purifier entries: trained:<preset> "
                     "(default trained:small), a .safetensors/.pt file, or robustbench:<name>."),
        click.option("--threat", default="linf", show_default=True, type=click.Choice(["linf", "l2"])),
        click.option("--eps", "eps", multiple=True, default=("8/255",), show_default=True,
                     help="Radius as 8/255 or 0.0314; several for a grid."),
        click.option("--attack", "attacks", multiple=True, default=("pgd:steps=20", "autoattack"), show_default=True,
                     help=f"NAME[:key=value,...], one of: {registry_help('attack')} (see `harness list --attacks`)."),
        click.option("--protocol", "protocols", multiple=True, default=("non-adaptive,adaptive",), show_default=True,
                     help=f"Any of: {registry_help('protocol')} (see `harness list --protocols`)."),
        click.option("--n", default=512, show_default=True,
                     help="Number of test images (the first n of a fixed permutation of the split)."),
        click.option("--seed", "seeds", multiple=True, type=int, default=(0,), show_default=True,
                     help="Evaluation seed(s): attack start and defense noise."),
        click.option("--variant", "variants", multiple=True, default=("clean",), show_default=True,
                     help=f"Test-set variant(s), kinds: {registry_help('variant')} (see `harness list --variants`)."),
        click.option("--preset", default=None, help="Defense training preset (default: the entry's `small`)."),
        click.option("--train-seed", default=0, show_default=True, type=int,
                     help="Seed of the weights harness trains (base classifier, defense weights, robust classifiers)."),
        click.option("--train-dataset", "train_datasets", multiple=True, default=("same",), show_default=True,
                     help="Dataset(s) the purifiers are trained on, comma-separated; 'same' = --dataset. Another "
                          "dataset evaluates a transferred purifier (resized / channel-mapped to its input shape)."),
        click.option("--train-classifier", default=None,
                     help="Classifier the transferred purifiers are trained against (default: --classifier)."),
        option_values,
        click.option("--channels-last", is_flag=True,
                     help="Run the networks on channels-last inputs (recorded in the cell key)."),
        click.option("--autocast", default=None, type=click.Choice(list(AUTOCAST)),
                     help="Run the networks under bfloat16 autocast, outputs back in float32 (recorded in the cell "
                          "key)."),
        *study_options,
        db_option,
        data_option,
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


study_options = (
    click.option("--study", default=None, help="A study (leaderboards/studies/NAME.toml, or a .toml path) instead "
                 "of --defense and the grid options: every grid of the study, then its analyses (see "
                 "`harness list --studies`)."),
    click.option("--studies", "studies_dir", default=None,
                 help="Folder of study files (default: $HARNESS_STUDIES, else leaderboards/studies)."),
)

#: the grid options :func:`grid_request` reads (every other keyword is the command's own)
GRID_KEYWORDS = ("defenses", "dataset", "classifier", "threat", "eps", "attacks", "protocols", "n", "seeds",
                 "variants", "preset", "train_seed", "train_datasets", "train_classifier", "options",
                 "channels_last", "autocast")


def _flag(keyword: str) -> str:
    """The command-line flag of a grid keyword (``train_datasets`` -> ``--train-dataset``)."""
    plural = {"defenses": "defense", "attacks": "attack", "protocols": "protocol", "seeds": "seed",
              "variants": "variant", "train_datasets": "train_dataset", "options": "option"}
    return "--" + plural.get(keyword, keyword).replace("_", "-")


def chosen_study(params: dict[str, Any]) -> str | None:
    """The ``--study`` of a grid command, refused beside ``--defense`` (one or the other names the grid);
    ``None`` when the grid is given by ``--defense``, which is then required."""
    study, defenses = params.get("study"), params.get("defenses")
    if study and defenses:
        raise UsageError("--study and --defense are mutually exclusive: a study names its own defenses; "
                         "give one of them")
    if study:
        context = click.get_current_context(silent=True)
        given = [name for name in GRID_KEYWORDS if context is not None
                 and context.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]
        if given:
            raise UsageError(f"--study names its own grids: drop {_flag(given[0])} (the grid options apply "
                             f"to --defense only)")
    if not study and not defenses:
        from harness.core.entry import defense_registry

        raise UsageError(f"give --defense NAME[,NAME...] or --study NAME; valid defenses: "
                         f"{', '.join(defense_registry().names())}")
    return study


def grid_request(params: dict[str, Any], **settings: Any):
    """The :class:`~harness.evaluation.runner.RunRequest` of the grid options in ``params`` (how
    ``harness run`` parses them), with the run ``settings`` (batch size, force, ...) added."""
    from harness.attacks.catalog import parse_attack_spec
    from harness.classifiers.sources import DEFAULT_CLASSIFIER
    from harness.evaluation.runner import RunRequest

    return RunRequest(
        defenses=split_csv(params["defenses"]), dataset=params["dataset"],
        classifier=params["classifier"] or DEFAULT_CLASSIFIER, threat=params["threat"], eps=split_csv(params["eps"]),
        attacks=tuple(parse_attack_spec(a) for a in params["attacks"]), protocols=split_csv(params["protocols"]),
        n=params["n"], seeds=tuple(params["seeds"]), variants=split_csv(params["variants"]), preset=params["preset"],
        train_datasets=tuple(None if d == "same" else d for d in split_csv(params["train_datasets"])),
        train_classifier=params["train_classifier"], options=parse_options(params["options"]),
        train_seed=params["train_seed"], channels_last=params["channels_last"], autocast=params["autocast"],
        data_root=params.get("data_root"), **settings)
