"""Option definitions and parsing shared by every command (one definition each, so commands cannot drift)."""

from __future__ import annotations

from typing import Any

import click

from harness.core.errors import UsageError

__all__ = ["db_option", "data_option", "option_values", "split_csv", "parse_options", "registry_help"]

db_option = click.option("--db", default=None, help="Results database: a file path or SQLAlchemy URL "
                         "(default: $HARNESS_DB or ./results.db).")
data_option = click.option("--data-root", default=None, help="Dataset folder (default: $HARNESS_DATA or "
                           "the user cache dir).")
option_values = click.option("--option", "options", multiple=True,
                             help="Defense option key=value (see `harness list --defense NAME`); stored in the cell.")


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
