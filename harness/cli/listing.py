"""``harness list``: the registered values of every axis, and one defense entry in full."""

from __future__ import annotations

import json
from typing import Any, Callable

import click

__all__ = ["list_entries"]


def _axes() -> dict[str, Callable[[], Any]]:
    from harness.attacks.catalog import attack_registry
    from harness.classifiers.architectures import architecture_registry
    from harness.classifiers.sources import source_registry
    from harness.core.entry import defense_registry
    from harness.data.formats import format_registry
    from harness.data.variants import variant_registry
    from harness.evaluation.protocols import protocol_registry

    return {"defenses": defense_registry, "attacks": attack_registry, "protocols": protocol_registry,
            "architectures": architecture_registry, "formats": format_registry, "variants": variant_registry,
            "classifiers": source_registry}


def _show_axis(axis: str, registry) -> None:
    items = registry.items()
    click.echo(f"{axis}:")
    width = max([len(i.name) for i in items] + [4])
    for item in items:
        source = "" if item.distribution in ("", "harness") else f" [{item.source}]"
        paper = f" ({item.paper})" if item.paper else ""
        click.echo(f"  {item.name:<{width}}  {item.summary}{paper}{source}")
    for error in registry.errors():
        click.echo(f"  {error.name:<{width}}  ERROR [{error.source}]: {error.error}")


def _show_defenses(registry) -> None:
    click.echo(f"{'name':<18} {'kind':<11} {'role':<9} {'stochastic':<10} {'datasets':<18} paper")
    for item in registry.items():
        e = item.value
        source = "" if item.distribution in ("", "harness") else f" [{item.source}]"
        citation = f" ({e.citation})" if e.citation not in ("", "-") else ""
        click.echo(f"{e.name:<18} {e.kind.value:<11} {e.role.value:<9} {str(e.stochastic).lower():<10} "
                   f"{','.join(e.datasets) or 'any':<18} {e.paper}{citation}{source}")
    for error in registry.errors():
        click.echo(f"{error.name:<18} ERROR [{error.source}]: {error.error}")


def _show_entry(name: str) -> None:
    from harness.core.entry import defense_registry

    info = defense_registry().info(name)
    e = info.value
    click.echo(f"{e.name} {e.version} ({e.kind.value}, {e.role.value}) [{info.source}]")
    click.echo(f"  paper:       {e.paper}")
    click.echo(f"  citation:    {e.citation}")
    if e.description:
        click.echo(f"  description: {e.description}")
    click.echo(f"  datasets:    {', '.join(e.datasets) or 'any'}; stochastic {str(e.stochastic).lower()}; "
               f"differentiable {str(e.differentiable).lower()}")
    meta = {k: v for k, v in e.metadata.describe().items() if v not in (None, "")}
    click.echo("  metadata:    " + (", ".join(f"{k} {v}" for k, v in meta.items()) or "(none)"))
    click.echo(f"  presets:     {', '.join(e.presets) or '(none)'}" +
               (f" (default {e.default_preset})" if e.presets else ""))
    for preset in e.presets:
        click.echo(f"    {preset}: {json.dumps(e.preset_config(preset), sort_keys=True)}")
    click.echo("  options:" + ("" if e.options else "     (none)"))
    for o in e.options:
        default = o.default if o.default is not None else _preset_defaults(e, o.name)
        choices = f" [{'|'.join(map(str, o.choices))}]" if o.choices else ""
        click.echo(f"    {o.name} ({o.type.__name__}{choices}, default {default}): {o.help}")
    click.echo("  reported:" + ("" if e.reported else "    (none)"))
    for r in e.reported:
        click.echo(f"    {r.dataset} {r.threat} {r.eps} {r.tier}, {r.attack}: clean {r.clean} robust {r.robust} "
                   f"({r.unit}; {r.source})")


def _show_studies(folder: str | None) -> None:
    """Every study file, validated, with its grids, analyses and what it renders."""
    from harness.analysis.studies import load_studies, study_dirs

    found = load_studies(folder)
    click.echo(f"studies ({', '.join(map(str, study_dirs(folder)))}):")
    width = max([len(s.name) for s in found] + [4])
    for study in found:
        grids = "; ".join(f"{','.join(r.defenses)} on {r.dataset}"
                          + (f" (train seed {r.train_seed})" if r.train_seed else "") for r in study.requests())
        analyses = ", ".join(a.kind for a in study.analyses)
        click.echo(f"  {study.name:<{width}}  {study.title}")
        click.echo(f"  {'':<{width}}  grids: {grids}" + (f"; analyses: {analyses}" if analyses else ""))
        click.echo(f"  {'':<{width}}  renders: {', '.join(r.label for r in study.renders) or '-'}")


def _preset_defaults(entry, option: str) -> str:
    values = {p: entry.preset_config(p).get(option) for p in entry.presets}
    shown = ", ".join(f"{p} {v}" for p, v in values.items() if v is not None)
    return f"preset ({shown})" if shown else "unset"


@click.command(name="list")
@click.option("--defense", "defense", default=None, help="Show one defense entry in full: options, presets, "
              "metadata, reported numbers.")
@click.option("--attacks", "axes", flag_value="attacks", multiple=True, help="List the attacks.")
@click.option("--protocols", "axes", flag_value="protocols", multiple=True, help="List the protocols.")
@click.option("--architectures", "axes", flag_value="architectures", multiple=True,
              help="List the classifier architectures.")
@click.option("--formats", "axes", flag_value="formats", multiple=True, help="List the dataset formats.")
@click.option("--variants", "axes", flag_value="variants", multiple=True, help="List the dataset variants.")
@click.option("--classifiers", "axes", flag_value="classifiers", multiple=True,
              help="List the classifier sources.")
@click.option("--studies", "studies", is_flag=True, help="List the studies (leaderboards/studies/*.toml).")
@click.option("--studies-dir", default=None, help="Folder of study files for --studies (default: "
              "$HARNESS_STUDIES, else leaderboards/studies).")
@click.option("--all", "everything", is_flag=True, help="List every axis.")
def list_entries(defense, axes, studies, studies_dir, everything) -> None:
    """List the registered defenses (first-party and plugins) or, with a flag, another axis."""
    registries = _axes()
    if defense:
        _show_entry(defense)
        return
    if studies:
        _show_studies(studies_dir)
        if not axes and not everything:
            return
    chosen = list(registries) if everything else list(dict.fromkeys(axes)) or ["defenses"]
    for axis in chosen:
        if axis == "defenses":
            _show_defenses(registries[axis]())
        else:
            _show_axis(axis, registries[axis]())
