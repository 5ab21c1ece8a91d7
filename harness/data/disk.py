"""The on-disk store of imported datasets, and the :class:`Split` it loads.

Each dataset lives in ``<root>/<name>/``: ``train.npz`` and ``test.npz`` (uncompressed; ``images``
uint8 (N, C, H, W) and ``labels`` int64 (N,)) and ``meta.json`` (source, class names, per-split counts
and fingerprints, original file name, archive sha256). A dataset is written into a hidden temporary
folder that is renamed into place, so an interrupted import never leaves a half-written dataset. The
images are written (and fingerprinted) block by block as the decoder yields them, so an import holds
one block of decoded images in memory, not the whole split; loading a split reads it whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from harness.data.catalog import SPLITS, DatasetInfo
from harness.data.formats import Decoded, DecodedSplit
from harness.core.errors import MissingArtifactError, UsageError

META = "meta.json"
FORMAT = 1
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """One split of a dataset, fully in memory."""

    info: DatasetInfo
    split: str  # "train" | "test"
    images: torch.Tensor  # uint8 (N, C, H, W), contiguous
    labels: torch.Tensor  # int64 (N,)
    fingerprint: str  # sha256 of images bytes + labels bytes of this split, first 16 hex digits
    source: str  # where it came from, e.g. "cifar10 official (python pickle)"

    def float_images(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """The images (or those at ``indices``) as float32 in [0, 1]."""
        images = self.images if indices is None else self.images[indices]
        return images.float().div_(255)


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """Content hash of one split: sha256 over the uint8 image bytes then the int64 label bytes."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images, dtype=np.uint8).data)
    digest.update(np.ascontiguousarray(labels, dtype="<i8").data)
    return digest.hexdigest()[:16]


def read_meta(root: Path, name: str) -> dict[str, Any] | None:
    """``meta.json`` of a stored dataset, or None if it is not stored."""
    path = root / name / META
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        log.warning("ignoring unreadable %s; the dataset counts as absent", path)
        return None


@contextlib.contextmanager
def locked(root: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on dataset ``name`` (serializes imports and fetches of it).

    Temp files of ``name`` found once the lock is held are leftovers of a killed import: a previous
    copy set aside by a swap that did not finish is restored, anything else removed.
    """
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if (root / f".{name}.old").exists() and not (root / name).exists():
                os.replace(root / f".{name}.old", root / name)
            for pattern in ("importing-*", "old", "download-*"):
                for stale in root.glob(f".{name}.{pattern}"):
                    log.info("removing %s, left by an interrupted import", stale)
                    if stale.is_dir():
                        shutil.rmtree(stale)
                    else:
                        stale.unlink()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_labels(info: DatasetInfo, split: str, labels: np.ndarray) -> None:
    if labels.ndim != 1 or len(labels) == 0:
        raise UsageError(f"{split} has no images")
    if labels.min() < 0 or labels.max() >= info.num_classes:
        raise UsageError(f"{split} labels span {labels.min()}..{labels.max()}, "
                         f"expected 0..{info.num_classes - 1}")


def _write_split(path: Path, info: DatasetInfo, split: str, data: DecodedSplit) -> str:
    """Write one split as an uncompressed ``.npz``, streaming its image blocks; return its fingerprint."""
    labels = np.ascontiguousarray(data.labels, dtype=np.int64)
    _check_labels(info, split, labels)
    n, digest, written = len(labels), hashlib.sha256(), 0
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (n, *info.image_shape)}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("images.npy", "w", force_zip64=True) as out:
            np.lib.format.write_array_header_1_0(out, header)
            for block in data.blocks:
                if block.dtype != np.uint8 or block.shape[1:] != info.image_shape or written + len(block) > n:
                    raise UsageError(f"{split} images come as {block.shape} ({block.dtype}) after {written} "
                                     f"of {n}, expected ({n}, {', '.join(map(str, info.image_shape))}) uint8")
                view = np.ascontiguousarray(block).data
                out.write(view)
                digest.update(view)
                written += len(block)
            if written != n:
                raise UsageError(f"{split}: {n} labels but {written} images")
        with archive.open("labels.npy", "w", force_zip64=True) as out:
            np.lib.format.write_array(out, labels)
    digest.update(labels.astype("<i8", copy=False).data)
    return digest.hexdigest()[:16]


def write_dataset(root: Path, info: DatasetInfo, decoded: Decoded, source: str,
                  provenance: dict[str, Any]) -> dict[str, Any]:
    """Store ``decoded`` as dataset ``info.name`` (replacing any previous copy); return its meta.

    Call under :func:`locked`, which also clears what a killed call left behind.
    """
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{info.name}.importing-", dir=root))
    try:
        splits = {}
        for split in SPLITS:
            data = decoded.splits[split]
            fingerprint = _write_split(tmp / f"{split}.npz", info, split, data)
            splits[split] = {"n": len(data.labels), "fingerprint": fingerprint}
        meta = {
            "format": FORMAT, "name": info.name, "source": source, "classes": list(decoded.classes),
            "image_shape": list(info.image_shape), "splits": splits,
            "imported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **provenance,
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        target = root / info.name
        old = root / f".{info.name}.old"
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def read_split(root: Path, info: DatasetInfo, split: str) -> Split:
    """Load a stored split; checks shapes and counts against ``meta.json`` (the fingerprint is cached)."""
    name = info.name
    meta = read_meta(root, name)
    if meta is None:
        raise MissingArtifactError(f"dataset {name} is not in {root}")
    try:
        expected = meta["splits"][split]
        with np.load(root / name / f"{split}.npz") as arrays:
            images, labels = arrays["images"], arrays["labels"]
        if (meta.get("format") != FORMAT or images.dtype != np.uint8 or labels.dtype != np.int64
                or images.shape != (expected["n"], *info.image_shape) or labels.shape != (expected["n"],)
                or len(meta["classes"]) != info.num_classes):
            raise ValueError("arrays do not match meta.json")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise MissingArtifactError(
            f"stored dataset {name} in {root / name} is damaged or from another harness version ({exc}); "
            f"re-import it with `harness data import {name} PATH` or `harness data fetch {name}`") from exc
    info = dataclasses.replace(info, classes=tuple(meta["classes"]))
    return Split(info, split, torch.from_numpy(images), torch.from_numpy(labels),
                 expected["fingerprint"], meta["source"])
