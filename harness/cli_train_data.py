"""``harness train ...`` and ``harness data ...``: produce the artifacts and data that runs use."""

from __future__ import annotations

import click

_data_option = click.option("--data-root", default=None, help="Dataset folder (default: $HARNESS_DATA or "
                            "the user cache dir).")


@click.group()
def train() -> None:
    """Train artifacts ahead of time (runs also train missing ones on demand)."""


@train.command(name="classifier")
@click.option("--dataset", default="cifar10", show_default=True)
@click.option("--preset", default="small", show_default=True, help="Classifier recipe preset.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default=None, type=click.Path(), help="Also export the weights to this .safetensors file.")
@_data_option
def train_classifier_cmd(dataset, preset, seed, out, data_root) -> None:
    """Train (or reuse) the base classifier of a preset; print its id."""
    from harness.artifacts import ArtifactCache
    from harness.classifiers import resolve_classifier, save_classifier
    from harness.data import dataset_info
    from harness.train.classifier import CLASSIFIER_PRESETS

    info = dataset_info(dataset)
    loaded = resolve_classifier(f"trained:{preset}", info, artifacts=ArtifactCache(), data_root=data_root,
                                seed=seed)
    click.echo(loaded.id)
    if out:
        click.echo(str(save_classifier(loaded.model, CLASSIFIER_PRESETS[preset]["arch"], info.num_classes, out)))


@train.command(name="defense")
@click.argument("name")
@click.option("--dataset", default="cifar10", show_default=True)
@click.option("--classifier", default="trained:small", show_default=True)
@click.option("--preset", default=None, help="Defense preset (default: the entry's `small`).")
@click.option("--seed", default=0, show_default=True)
@_data_option
def train_defense_cmd(name, dataset, classifier, preset, seed, data_root) -> None:
    """Train (or reuse) a defense entry's weights; print the artifact folder."""
    from harness.artifacts import ArtifactCache
    from harness.building import resolve_preset, train_defense_weights
    from harness.classifiers import resolve_classifier
    from harness.data import dataset_info
    from harness.registry import default_registry

    entry = default_registry().get(name)
    info = dataset_info(dataset)
    artifacts = ArtifactCache()
    loaded = resolve_classifier(classifier, info, artifacts=artifacts, data_root=data_root, seed=seed)
    artifact = train_defense_weights(entry, resolve_preset(entry, preset), loaded, info, artifacts,
                                     data_root=data_root, seed=seed)
    click.echo(str(artifact.path))


@train.command(name="ddpm")
@click.option("--dataset", default="cifar10", show_default=True)
@click.option("--preset", default="small", show_default=True, help="DDPM preset: tiny, small or paper.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default=None, type=click.Path(), help="Also write a save_pretrained folder here "
              "(loadable with --option unet=PATH).")
@_data_option
def train_ddpm_cmd(dataset, preset, seed, out, data_root) -> None:
    """Train (or reuse) the DDPM shared by the diffusion purifiers; print the artifact folder."""
    from harness.artifacts import ArtifactCache
    from harness.data import load_split
    from harness.diffusion.model import ddpm_preset, unet_from_state
    from harness.diffusion.train import shared_ddpm

    ddpm_preset(preset)  # a bad preset name fails before the data are loaded
    split = load_split(dataset, "train", data_root)
    artifact = shared_ddpm(ArtifactCache(), preset, split, seed)
    click.echo(str(artifact.path))
    if out:
        loaded = unet_from_state(preset, artifact.load(), split.info.image_shape, {})
        loaded.unet.save_pretrained(out)
        loaded.scheduler.save_pretrained(f"{out}/scheduler")
        click.echo(str(out))


@click.group()
def data() -> None:
    """Import, download and inspect datasets."""


@data.command(name="import")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True))
@_data_option
def data_import(name, path, data_root) -> None:
    """Import NAME from PATH: the official python-pickle archive/folder, or an ImageFolder
    folder/archive (train/<class>/*, test/<class>/*)."""
    from harness.data import import_dataset

    click.echo(str(import_dataset(name, path, data_root)))


@data.command(name="fetch")
@click.argument("name")
@click.option("--url", default=None, help="Download from this URL instead of the official one.")
@_data_option
def data_fetch(name, url, data_root) -> None:
    """Download NAME's official archive, verify its checksum and import it."""
    from harness.data import fetch_dataset

    click.echo(str(fetch_dataset(name, data_root, url=url)))


@data.command(name="info")
@_data_option
def data_info(data_root) -> None:
    """Show which datasets are present, their sources and fingerprints."""
    from harness.data import dataset_status

    for row in dataset_status(data_root):
        click.echo("  ".join(f"{k}={v}" for k, v in row.items()))


@click.group()
def analyse() -> None:
    """Analyses beyond accuracy; their results appear in `harness report`."""


@analyse.command(name="fixed-randomness")
@click.option("--defense", required=True, help="A (stochastic) purifier entry.")
@click.option("--dataset", default="cifar10", show_default=True)
@click.option("--classifier", default="trained:small", show_default=True)
@click.option("--preset", default=None)
@click.option("--option", "options", multiple=True, help="Defense option key=value, as for `harness run`.")
@click.option("--n", default=32, show_default=True, help="Test images (the same subset a cell uses).")
@click.option("--seed", default=0, show_default=True)
@click.option("--eps", default="8/255", show_default=True)
@click.option("--steps", default=20, show_default=True, help="PGD steps of the fixed-randomness attack.")
@click.option("--db", default=None, help="Results database the record is stored in: a file path or SQLAlchemy "
              "URL (default: $HARNESS_DB or ./results.db).")
@_data_option
def analyse_fixed_randomness(defense, dataset, classifier, preset, options, n, seed, eps, steps, db,
                             data_root) -> None:
    """Distances to the clean image, spread across seeds vs inputs, and compression rates (Liu & Wei,
    arXiv 2505.22839), with the purifier's noise fixed per sample; stored in the results DB (prints
    the record's key)."""
    from harness.analysis.study import StudyRequest, run_study
    from harness.cli import parse_options
    from harness.store import open_db

    request = StudyRequest(defense=defense, dataset=dataset, classifier=classifier, preset=preset,
                           options=parse_options(options), n=n, seed=seed, eps=eps,
                           attack={"name": "pgd", "steps": steps}, data_root=data_root)
    click.echo(run_study(request, open_db(db)))
