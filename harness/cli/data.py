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
    """Show which datasets are present, their sources and fingerprints."""
    from harness.data import dataset_status

    for row in dataset_status(data_root):
        click.echo("  ".join(f"{k}={v}" for k, v in row.items()))
