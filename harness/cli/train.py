"""``harness train ...``: train the artifacts runs use (classifiers, defense weights, the shared DDPM)."""

from __future__ import annotations

import click

from harness.cli.options import data_option

__all__ = ["train"]


@click.group()
def train() -> None:
    """Train artifacts ahead of time (runs also train missing ones on demand)."""


@train.command(name="classifier")
@click.option("--dataset", default="cifar10", show_default=True)
@click.option("--preset", default="small", show_default=True, help="Classifier recipe preset.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default=None, type=click.Path(), help="Also export the weights to this .safetensors file.")
@data_option
def train_classifier_cmd(dataset, preset, seed, out, data_root) -> None:
    """Train (or reuse) the base classifier of a preset; print its id."""
    from harness.core.artifacts import ArtifactCache
    from harness.classifiers.sources import resolve_classifier, save_classifier
    from harness.data import dataset_info
    from harness.classifiers.training import CLASSIFIER_PRESETS

    info = dataset_info(dataset)
    loaded = resolve_classifier(f"trained:{preset}", info, artifacts=ArtifactCache(), data_root=data_root,
                                seed=seed)
    click.echo(loaded.id)
    if out:
        click.echo(str(save_classifier(loaded.model, CLASSIFIER_PRESETS[preset]["arch"], info.num_classes, out)))


@train.command(name="defense")
@click.argument("name")
@click.option("--dataset", default="cifar10", show_default=True)
@click.option("--classifier", default="trained:small", show_default=True,
              help="Base classifier of a purifier (ignored for entries of kind classifier).")
@click.option("--preset", default=None, help="Defense preset (default: the entry's `small`).")
@click.option("--seed", default=0, show_default=True)
@data_option
def train_defense_cmd(name, dataset, classifier, preset, seed, data_root) -> None:
    """Train (or reuse) a defense entry's weights; print the artifact folder."""
    from harness.core.artifacts import ArtifactCache
    from harness.evaluation.building import train_defense_weights
    from harness.classifiers.sources import resolve_classifier
    from harness.data import dataset_info
    from harness.core.entry import defense_registry

    entry = defense_registry().get(name)
    info = dataset_info(dataset)
    artifacts = ArtifactCache()
    loaded = (resolve_classifier(classifier, info, artifacts=artifacts, data_root=data_root, seed=seed)
              if entry.uses_base_classifier else None)
    artifact = train_defense_weights(entry, entry.resolve_preset(preset), loaded, info, artifacts,
                                     data_root=data_root, seed=seed)
    click.echo(str(artifact.path))


@train.command(name="ddpm")
@click.option("--dataset", default="cifar10", show_default=True)
@click.option("--preset", default="small", show_default=True, help="DDPM preset: tiny, small or paper.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default=None, type=click.Path(), help="Also write a save_pretrained folder here "
              "(loadable with --option unet=PATH).")
@data_option
def train_ddpm_cmd(dataset, preset, seed, out, data_root) -> None:
    """Train (or reuse) the DDPM shared by the diffusion purifiers; print the artifact folder."""
    from harness.core.artifacts import ArtifactCache
    from harness.data import load_split
    from harness.toolkit.diffusion.model import ddpm_preset, unet_from_state
    from harness.toolkit.diffusion.train import shared_ddpm

    ddpm_preset(preset)  # a bad preset name fails before the data are loaded
    split = load_split(dataset, "train", data_root)
    artifact = shared_ddpm(ArtifactCache(), preset, split, seed)
    click.echo(str(artifact.path))
    if out:
        loaded = unet_from_state(preset, artifact.load(), split.info.image_shape, {})
        loaded.unet.save_pretrained(out)
        loaded.scheduler.save_pretrained(f"{out}/scheduler")
        click.echo(str(out))
