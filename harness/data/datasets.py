"""Importing datasets into the data root, loading splits (auto-importing from a local mirror), status."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from harness.data import disk
from harness.data.catalog import CatalogEntry, catalog_entry, check_split, dataset_names
from harness.data.formats import decoding
from harness.data.sources import file_sha256
from harness.core.errors import MissingArtifactError, UsageError
from harness.core.paths import data_root

MIRROR_ENV = "HARNESS_DATA_MIRROR"
log = logging.getLogger(__name__)


def import_dataset(name: str, path: str | os.PathLike, root: str | os.PathLike | None = None, *,
                   progress: bool = True) -> Path:
    """Import ``path`` as dataset ``name`` into the data root; return the dataset's folder.

    ``path`` is the official release (``cifar-10-python.tar.gz`` or its extracted folder; a folder or
    archive holding the four IDX files of (Fashion-)MNIST, gzipped or not) or an ImageFolder
    (``train/<class>/*`` and ``test/<class>/*`` or ``val/<class>/*``) as a folder or a .tar/.tar.gz/.zip
    archive. Any previous copy of the dataset is replaced.
    """
    entry = catalog_entry(name)
    root = data_root(root)
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    with disk.locked(root, name):
        import_from(entry, path, root, progress)
    return root / name


def import_from(entry: CatalogEntry, path: Path, root: Path, progress: bool, original: str | None = None,
                url: str | None = None) -> dict[str, Any]:
    """Decode and store ``path`` (call under ``disk.locked``); return the stored meta."""
    name = entry.info.name
    original = original or path.name
    archive = path.is_file()
    with decoding(entry, path, progress) as decoded:
        if decoded.official:
            source = f"{name} official ({decoded.kind})"
        else:
            source = f"{name} ImageFolder {'archive' if archive else 'folder'} {original}"
        provenance: dict[str, Any] = {"original": original,
                                      "archive_sha256": file_sha256(path) if archive else None}
        if decoded.files_sha256:
            provenance["files_sha256"] = decoded.files_sha256
        if decoded.preprocess:
            provenance["preprocess"] = decoded.preprocess
        if url:
            provenance["url"] = url
        meta = disk.write_dataset(root, entry.info, decoded, source, provenance)
    splits = meta["splits"]
    log.info("imported %s from %s into %s: %d train / %d test images, fingerprints train %s, test %s",
             name, original, root / name, splits["train"]["n"], splits["test"]["n"],
             splits["train"]["fingerprint"], splits["test"]["fingerprint"])
    return meta


def load_split(name: str, split: str, root: str | os.PathLike | None = None) -> disk.Split:
    """Load ``split`` ("train" or "test") of dataset ``name`` from the data root.

    A dataset missing from the root is imported from ``$HARNESS_DATA_MIRROR`` if it has one of the
    known files; otherwise this raises MissingArtifactError saying how to get it.
    """
    entry = catalog_entry(name)
    check_split(split)
    root = data_root(root)
    if disk.read_meta(root, name) is None:
        _import_from_mirror(entry, root)
    return disk.read_split(root, entry.info, split)


def mirror_dirs() -> list[Path]:
    """Folders named by ``$HARNESS_DATA_MIRROR`` (comma-separated)."""
    value = os.environ.get(MIRROR_ENV, "")
    return [Path(part.strip()).expanduser() for part in value.split(",") if part.strip()]


def _import_from_mirror(entry: CatalogEntry, root: Path) -> None:
    """Import ``entry`` from the first usable mirror file (official archives preferred)."""
    name = entry.info.name
    dirs = mirror_dirs()
    candidates = [d / n for n in entry.mirror_names for d in dirs if (d / n).exists()]
    failures = []
    if candidates:
        with disk.locked(root, name):
            if disk.read_meta(root, name) is not None:  # imported meanwhile by another process
                return
            for candidate in candidates:
                log.info("dataset %s is not in %s; importing it from mirror %s", name, root, candidate)
                try:
                    import_from(entry, candidate, root, progress=True)
                    return
                except UsageError as exc:
                    log.warning("cannot import %s from mirror %s: %s", name, candidate, exc)
                    failures.append(f"{candidate}: {exc}")
    looked = (f" ({MIRROR_ENV} has none of them: {', '.join(map(str, dirs))})" if dirs and not failures
              else f" (mirror files failed: {'; '.join(failures)})" if failures else "")
    fetch = (f"run `harness data fetch {name}` (downloads the official release) or " if entry.official
             else f"{entry.how_to_get}; or ")
    raise MissingArtifactError(
        f"dataset {name} is not in {root}; {fetch}`harness data import {name} PATH` (official release or "
        f"ImageFolder folder/archive), or set {MIRROR_ENV} to a folder holding one of "
        f"{', '.join(entry.mirror_names)}{looked}")


def dataset_status(root: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One row per known dataset, for ``harness data info``."""
    root = data_root(root)
    rows = []
    for name in dataset_names():
        info = catalog_entry(name).info
        meta = disk.read_meta(root, name) or {}
        splits = meta.get("splits", {})
        rows.append({
            "name": name, "shape": "x".join(map(str, info.image_shape)), "classes": info.num_classes,
            "present": bool(meta), "source": meta.get("source"),
            "n_train": splits.get("train", {}).get("n"), "n_test": splits.get("test", {}).get("n"),
            "fingerprints": {s: v["fingerprint"] for s, v in splits.items()},
            "original": meta.get("original"), "path": str(root / name),
        })
    return rows
