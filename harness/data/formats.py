"""Decoding an import source into uint8 arrays: the official python-pickle release, or an ImageFolder.

ImageFolder sample order: class by class in label order, and within a class the files sorted by name,
digit runs compared as numbers (``2.png`` before ``10.png``; zero-padded names sort the same either way).
Class folders whose names all match the dataset's class names (case-insensitive) get the standard
labels (a subset of the classes is allowed); otherwise there must be exactly ``num_classes`` folders,
labelled in sorted order (same rule). Note that an ImageFolder copy is therefore ordered by class, not
in the official sample order.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from tqdm import tqdm

from harness.data.catalog import SPLITS, CatalogEntry, DatasetInfo
from harness.data.sources import read_files
from harness.errors import UsageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
_POOL_MIN_IMAGES = 4096  # below this a process pool costs more than it saves
_CHUNK = 1000


@dataclass(frozen=True)
class Decoded:
    """Decoded splits (``split -> (images uint8 (N, C, H, W), labels int64 (N,))``) and class names."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    classes: tuple[str, ...]
    official: bool  # python-pickle release (else ImageFolder)


def decode(entry: CatalogEntry, path: Path, progress: bool = True) -> Decoded:
    """Read ``path`` (folder or archive) in whichever supported format it holds."""
    official_names = entry.official.all_files()
    files = read_files(path, lambda p: p.name in official_names or p.suffix.lower() in IMAGE_SUFFIXES)
    pickles = _official_files(entry, files)
    if pickles is not None:
        return _decode_official(entry, pickles)
    images = {p: b for p, b in files.items()
              if p.suffix.lower() in IMAGE_SUFFIXES and len(p.parts) >= 3 and p.parts[-3] in SPLITS}
    if images:
        return _decode_imagefolder(entry.info, images, progress)
    raise UsageError(
        f"{path} holds neither the official {entry.info.name} python batches "
        f"({', '.join(sorted(entry.official.all_files()))}) nor an ImageFolder layout "
        f"(train/<class>/*.png|jpg and test/<class>/*)")


def natural_key(name: str) -> tuple:
    """Sort key comparing digit runs as numbers: ``img2`` < ``img10``."""
    return tuple((0, int(t), t) if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)


# --- official python-pickle release -------------------------------------------------------------

_ALLOWED_GLOBALS = {  # what numpy arrays and py2 byte strings need; nothing that can run code
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only resolves numpy array constructors, so a crafted archive cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module.replace("numpy.core.", "numpy._core."), name)


def _unpickle(blob: bytes, what: str) -> dict:
    try:
        obj = _ArrayUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except Exception as exc:
        raise UsageError(f"cannot read {what} as a CIFAR python batch: {exc}") from exc
    if not isinstance(obj, dict):
        raise UsageError(f"{what} is not a CIFAR python batch (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _official_files(entry: CatalogEntry, files: dict[PurePosixPath, bytes]) -> dict[str, bytes] | None:
    """The official pickles by file name, if one folder of ``files`` holds all split files."""
    needed = entry.official.all_files() - {entry.official.meta_file}
    by_folder: dict[PurePosixPath, dict[str, bytes]] = {}
    for path, blob in files.items():
        by_folder.setdefault(path.parent, {})[path.name] = blob
    for folder in sorted(by_folder):
        if needed <= by_folder[folder].keys():
            return by_folder[folder]
    return None


def _decode_official(entry: CatalogEntry, pickles: dict[str, bytes]) -> Decoded:
    info, layout = entry.info, entry.official
    splits = {}
    for split, names in layout.files.items():
        images, labels = [], []
        for name in names:
            batch = _unpickle(pickles[name], name)
            if "data" not in batch or layout.label_key not in batch:
                raise UsageError(f"{name} lacks the keys 'data' and {layout.label_key!r}")
            data = np.asarray(batch["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != int(np.prod(info.image_shape)):
                raise UsageError(f"{name}: 'data' has shape {data.shape}, expected (N, "
                                 f"{int(np.prod(info.image_shape))})")
            images.append(data.reshape(-1, *info.image_shape))
            labels.append(np.asarray(batch[layout.label_key], dtype=np.int64))
        splits[split] = (np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))
    classes = info.classes
    if layout.meta_file in pickles:
        names = _unpickle(pickles[layout.meta_file], layout.meta_file).get(layout.names_key)
        if names is not None and len(names) == info.num_classes:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return Decoded(splits, classes, official=True)


# --- ImageFolder ----------------------------------------------------------------------------------

def _class_labels(info: DatasetInfo, folders: set[str]) -> tuple[dict[str, int], tuple[str, ...]]:
    """Label of each class folder, and the class names of the dataset (see the module docstring)."""
    standard = {c.lower(): i for i, c in enumerate(info.classes)}
    if all(f.lower() in standard for f in folders):
        return {f: standard[f.lower()] for f in folders}, info.classes
    if len(folders) != info.num_classes:
        raise UsageError(
            f"found {len(folders)} class folders ({', '.join(sorted(folders, key=natural_key)[:12])}...) "
            f"whose names are not all {info.name} class names; name the folders after the classes "
            f"({', '.join(info.classes[:10])}...) or provide exactly {info.num_classes} folders")
    ordered = tuple(sorted(folders, key=natural_key))
    return {f: i for i, f in enumerate(ordered)}, ordered


def _decode_imagefolder(info: DatasetInfo, images: dict[PurePosixPath, bytes], progress: bool) -> Decoded:
    roots = {p.parents[2] for p in images}
    if len(roots) > 1:
        raise UsageError(f"found several ImageFolder trees ({', '.join(sorted(map(str, roots)))}); "
                         f"import one folder holding train/ and test/")
    missing = [s for s in SPLITS if not any(p.parts[-3] == s for p in images)]
    if missing:
        raise UsageError(f"ImageFolder has no {' or '.join(missing)}/<class>/ images; both "
                         f"{' and '.join(SPLITS)} are needed")
    labels_of, classes = _class_labels(info, {p.parts[-2] for p in images})
    splits = {}
    for split in SPLITS:
        members = sorted((p for p in images if p.parts[-3] == split),
                         key=lambda p: (labels_of[p.parts[-2]], natural_key(p.name), p.parts[-2]))
        blobs = [(str(p), images[p]) for p in members]
        labels = np.array([labels_of[p.parts[-2]] for p in members], dtype=np.int64)
        splits[split] = (decode_images(blobs, info.image_shape, progress, desc=f"decoding {split}"), labels)
    return Decoded(splits, classes, official=False)


def _decode_chunk(args: tuple[list[tuple[str, bytes]], tuple[int, int, int]]) -> np.ndarray:
    blobs, (c, h, w) = args
    mode = "RGB" if c == 3 else "L"
    out = np.empty((len(blobs), h, w, c), dtype=np.uint8)
    for i, (name, blob) in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(blob)) as im:
                if im.size != (w, h):
                    raise UsageError(f"image {name} is {im.size[0]}x{im.size[1]}, expected {w}x{h}")
                out[i] = np.asarray(im if im.mode == mode else im.convert(mode)).reshape(h, w, c)
        except UsageError:
            raise
        except Exception as exc:
            raise UsageError(f"cannot decode image {name}: {exc}") from None
    return out


def decode_images(blobs: list[tuple[str, bytes]], shape: tuple[int, int, int], progress: bool = True,
                  desc: str = "decoding") -> np.ndarray:
    """Decode ``(name, encoded bytes)`` pairs to uint8 (N, C, H, W), in order, with a progress bar.

    Large batches are decoded by a process pool (one worker per CPU).
    """
    chunks = [(blobs[i:i + _CHUNK], shape) for i in range(0, len(blobs), _CHUNK)]
    workers = min(os.cpu_count() or 1, len(chunks))
    parallel = len(blobs) >= _POOL_MIN_IMAGES and workers > 1
    parts = [np.empty((0, shape[1], shape[2], shape[0]), np.uint8)]
    with tqdm(total=len(blobs), desc=desc, unit="img", disable=not progress) as bar, \
            (multiprocessing.Pool(workers) if parallel else contextlib.nullcontext()) as pool:
        for part in pool.imap(_decode_chunk, chunks) if parallel else map(_decode_chunk, chunks):
            parts.append(part)
            bar.update(len(part))
    return np.ascontiguousarray(np.concatenate(parts).transpose(0, 3, 1, 2))
