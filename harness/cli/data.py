"""``harness data ...``: import, download and inspect datasets."""

from __future__ import annotations

import click

from harness.cli.options import data_option

__all__ = ["data"]


@click.group()
def data() -> None:
    """Import, download and inspect datasets."""


@data.command(name="import")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True))
@data_option
def data_import(name, path, data_root) -> None:
    """Import NAME from PATH: the official python-pickle archive/folder, or an ImageFolder
    folder/archive (train/<class>/*, test/<class>/*)."""
    from harness.data import import_dataset

    click.echo(str(import_dataset(name, path, data_root)))


@data.command(name="fetch")
@click.argument("name")
@click.option("--url", default=None, help="Download from this URL instead of the official one.")
@data_option
def data_fetch(name, url, data_root) -> None:
    """Download NAME's official archive, verify its checksum and import it."""
    from harness.data import fetch_dataset

    click.echo(str(fetch_dataset(name, data_root, url=url)))


@data.command(name="info")
@data_option
def data_info(data_root) -> None:
    """Show which datasets are present, their sources and fingerprints, then the synthetic (generated,
    training-only) sets: n, fingerprint, generator, sampler, guidance and label agreement."""
    from harness.core.artifacts import ArtifactCache
    from harness.data import dataset_status
    from harness.toolkit.synthetic import synthetic_sets

    for row in dataset_status(data_root):
        click.echo("  ".join(f"{k}={v}" for k, v in row.items()))
    for row in synthetic_sets(ArtifactCache()):
        click.echo("  ".join(f"{k}={v}" for k, v in row.items()))


@data.command(name="synth")
@click.option("--dataset", default="cifar10", show_default=True, help="Dataset whose conditional DDPM generates.")
@click.option("--n", "n", type=int, required=True, help="Number of images (class-balanced: label i % classes).")
@click.option("--sampler", default="ddim:steps=10", show_default=True,
              help="ddim:steps=K or ddpm:steps=K, optionally ,eta=E.")
@click.option("--guidance", type=float, default=None,
              help="Classifier-free guidance weight w >= 0 (0: conditional only)  [default: 1.0]")
@click.option("--seed", default=0, show_default=True, help="Sampling seed (the set's fingerprint changes with it).")
@click.option("--preset", default="small", show_default=True, help="DDPM preset of the generator: tiny, small, paper.")
@click.option("--agreement", is_flag=True, help="Also measure the agreement of --classifier's predictions "
              "with the requested labels (trains it if missing); stored with the set.")
@click.option("--classifier", default="trained:small", show_default=True, help="Classifier for --agreement.")
@click.option("--fid", is_flag=True, help="Also compute FID against the real training split (needs "
              "torch-fidelity and its Inception weights).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@data_option
def data_synth(dataset, n, sampler, guidance, seed, preset, agreement, classifier, fid, progress,
               data_root) -> None:
    """Generate (or reuse) a labelled synthetic training set with the dataset's class-conditional DDPM
    (trained if missing), DDIM sampling and classifier-free guidance; print its artifact and fingerprint."""
    from harness.core.artifacts import ArtifactCache
    from harness.data import load_split
    from harness.toolkit.synthetic import DEFAULT_GUIDANCE, frechet_distance, label_agreement, synthetic_set

    artifacts = ArtifactCache()
    made = synthetic_set(artifacts, dataset, n, sampler=sampler,
                         guidance=DEFAULT_GUIDANCE if guidance is None else guidance, seed=seed, preset=preset,
                         data_root=data_root, progress=progress)
    prov = made.provenance
    click.echo(str(made.path))
    click.echo(f"n={len(made)}  fingerprint={made.fingerprint}  generator={prov['generator']['artifact']}  "
               f"sampler={prov['sampler']}  guidance={prov['guidance']:g}  seed={prov['seed']}  "
               f"class_counts={','.join(map(str, made.class_counts()))}")
    if agreement:
        result = label_agreement(artifacts, made, classifier, data_root=data_root, progress=progress)
        click.echo(f"label_agreement={result['agreement']:.4f}  classifier={result['classifier']}")
    if fid:
        value = frechet_distance(made, load_split(dataset, "train", data_root), progress=progress)
        click.echo(f"fid={value:.3f}")
