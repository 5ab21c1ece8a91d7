"""Decoding an import source: a dataset's official release (python pickles or IDX files) or an ImageFolder.

See :mod:`harness.data.imagefolder` for the ImageFolder rules (sample order, class folders, resizing).
An official release is found in any folder of the source that holds all its split files.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import pickle
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from harness.data.catalog import CatalogEntry, DatasetInfo, IdxRelease, PickleRelease, Release
from harness.data.imagefolder import decode_imagefolder, is_image
from harness.data.sources import open_files
from harness.core.errors import UsageError
from harness.core.registry import Registry

IMAGEFOLDER = "ImageFolder"


@dataclass(frozen=True)
class DecodedSplit:
    """One split: labels int64 (N,), and the images as uint8 (n, C, H, W) blocks in order (one pass)."""

    labels: np.ndarray
    blocks: Iterable[np.ndarray]

    @classmethod
    def of(cls, images: np.ndarray, labels: np.ndarray) -> DecodedSplit:
        return cls(labels, (images,))


@dataclass(frozen=True)
class Decoded:
    """Decoded splits and class names; ``kind`` is the release kind ("python pickle", "IDX") or "ImageFolder"."""

    splits: dict[str, DecodedSplit]
    classes: tuple[str, ...]
    kind: str
    files_sha256: dict[str, str] = field(default_factory=dict)  # the release files read, when several
    preprocess: str | None = None  # what was done to the images beyond decoding

    @property
    def official(self) -> bool:
        return self.kind != IMAGEFOLDER


@contextlib.contextmanager
def decoding(entry: CatalogEntry, path: Path, progress: bool = True) -> Iterator[Decoded]:
    """Decode ``path`` (folder or archive) in whichever supported format it holds.

    ImageFolder images are read from ``path`` as the blocks are consumed: write them inside the context.
    """
    release = entry.official
    names = _release_names(release)
    with open_files(path, lambda p: p.name in names or is_image(p)) as files:
        found = _release_files(release, files) if release is not None else None
        if found is not None:
            yield format_registry().get(release.kind).decode(entry.info, release, found, files)
            return
        folder = decode_imagefolder(entry.info, files, entry.resize, progress)
        if folder is None:
            official = (f"the official {entry.info.name} {release.kind} files "
                        f"({', '.join(sorted(release.all_files()))}) nor " if release else "")
            raise UsageError(f"{path} holds neither {official}an ImageFolder layout (train/<class>/*.png|jpg "
                             f"and test/<class>/* or val/<class>/*)")
        splits, classes = folder
        yield Decoded({s: DecodedSplit(labels, blocks) for s, (labels, blocks) in splits.items()}, classes,
                      IMAGEFOLDER, preprocess=entry.resize.describe() if entry.resize else None)


def _release_names(release: Release | None) -> set[str]:
    """File names that may hold ``release``'s files (IDX files also uncompressed, without ``.gz``)."""
    if release is None:
        return set()
    names = release.all_files()
    if isinstance(release, IdxRelease):
        names |= {n.removesuffix(".gz") for n in names}
    return names


def _release_files(release: Release, files: Mapping[PurePosixPath, bytes]) -> dict[str, PurePosixPath] | None:
    """Release file name -> path in ``files``, from the first folder holding all the split files."""
    needed = release.all_files() - ({release.meta_file} if isinstance(release, PickleRelease) else set())
    by_folder: dict[PurePosixPath, dict[str, PurePosixPath]] = {}
    for path in files:
        name = path.name
        if isinstance(release, IdxRelease) and name not in needed and f"{name}.gz" in needed:
            name = f"{name}.gz"
        if name in release.all_files():
            by_folder.setdefault(path.parent, {}).setdefault(name, path)
    for folder in sorted(by_folder):
        if needed <= by_folder[folder].keys():
            return by_folder[folder]
    return None


# --- python-pickle release ------------------------------------------------------------------------

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


def _decode_pickles(info: DatasetInfo, layout: PickleRelease, found: dict[str, PurePosixPath],
                    files: Mapping[PurePosixPath, bytes]) -> Decoded:
    splits = {}
    for split, names in layout.files.items():
        images, labels = [], []
        for name in names:
            batch = _unpickle(files[found[name]], name)
            if "data" not in batch or layout.label_key not in batch:
                raise UsageError(f"{name} lacks the keys 'data' and {layout.label_key!r}")
            data = np.asarray(batch["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != int(np.prod(info.image_shape)):
                raise UsageError(f"{name}: 'data' has shape {data.shape}, expected (N, "
                                 f"{int(np.prod(info.image_shape))})")
            images.append(data.reshape(-1, *info.image_shape))
            labels.append(np.asarray(batch[layout.label_key], dtype=np.int64))
        splits[split] = DecodedSplit.of(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))
    classes = info.classes
    if layout.meta_file in found:
        names = _unpickle(files[found[layout.meta_file]], layout.meta_file).get(layout.names_key)
        if names is not None and len(names) == info.num_classes:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return Decoded(splits, classes, layout.kind)


# --- IDX files ------------------------------------------------------------------------------------

_IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049  # unsigned bytes, 3 dims / 1 dim


def parse_idx(blob: bytes, what: str) -> np.ndarray:
    """Decode one IDX file, gzipped or not: magic ``00 00 <type> <ndims>``, big-endian uint32 sizes, data.

    Raises UsageError naming ``what`` on a bad magic number, a truncated file or trailing bytes.
    """
    if blob[:2] == b"\x1f\x8b":
        try:
            blob = gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as exc:
            raise UsageError(f"{what} is a damaged gzip file: {exc}") from None
    if len(blob) < 4 or blob[:2] != b"\0\0" or blob[2] not in _IDX_TYPES or blob[3] == 0:
        raise UsageError(f"{what} is not an IDX file (magic number 0x{blob[:4].hex() or 'empty'}; expected "
                         f"0x0000TTDD with a known type TT and DD > 0 dimensions)")
    ndims, dtype = blob[3], _IDX_TYPES[blob[2]]
    start = 4 + 4 * ndims
    if len(blob) < start:
        raise UsageError(f"{what}: IDX header truncated ({len(blob)} bytes, {ndims} dimensions need {start})")
    shape = struct.unpack(f">{ndims}I", blob[4:start])
    size = int(np.prod(shape)) * dtype.itemsize
    if len(blob) - start != size:
        raise UsageError(f"{what}: {len(blob) - start} data bytes, but the header's shape {shape} needs "
                         f"{size}; the file is truncated or corrupt")
    return np.frombuffer(blob, dtype, offset=start).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def _magic(array: np.ndarray) -> int:
    return (0x08 << 8 | array.ndim) if array.dtype == np.uint8 else -1


def _decode_idx(info: DatasetInfo, release: IdxRelease, found: dict[str, PurePosixPath],
                files: Mapping[PurePosixPath, bytes]) -> Decoded:
    c, h, w = info.image_shape
    splits, digests = {}, {}
    for split, (images_file, labels_file) in release.files.items():
        arrays = {}
        for name in (images_file, labels_file):
            blob = files[found[name]]
            digests[found[name].name] = hashlib.sha256(blob).hexdigest()
            arrays[name] = parse_idx(blob, str(found[name]))
        images, labels = arrays[images_file], arrays[labels_file]
        if _magic(images) != IDX_IMAGES_MAGIC or images.shape[1:] != (h, w) or c != 1:
            raise UsageError(f"{found[images_file]}: IDX array {images.shape} of {images.dtype}, expected "
                             f"{info.name} images (N, {h}, {w}) of unsigned bytes (magic {IDX_IMAGES_MAGIC})")
        if _magic(labels) != IDX_LABELS_MAGIC:
            raise UsageError(f"{found[labels_file]}: IDX array {labels.shape} of {labels.dtype}, expected "
                             f"labels (N,) of unsigned bytes (magic {IDX_LABELS_MAGIC})")
        if len(labels) != len(images):
            raise UsageError(f"{split}: {len(labels)} labels in {found[labels_file]} for {len(images)} images "
                             f"in {found[images_file]}")
        splits[split] = DecodedSplit.of(images.reshape(-1, c, h, w), labels.astype(np.int64))
    return Decoded(splits, info.classes, release.kind, files_sha256=digests)


@dataclass(frozen=True)
class DatasetFormat:
    """An official release format: ``decode(info, release, found, files)`` turns the release files (name
    -> path in ``files``) into :class:`Decoded` splits."""

    name: str
    summary: str
    decode: Callable[[DatasetInfo, Any, dict[str, PurePosixPath], Mapping[PurePosixPath, bytes]], Decoded]


FORMAT_GROUP = "harness.formats"
_registry: Registry[DatasetFormat] | None = None


def format_registry() -> Registry[DatasetFormat]:
    """Every release format, by the ``kind`` of the catalog's releases (plugins: ``harness.formats``).
    ImageFolder layouts are the fallback for any dataset and are not a release format."""
    global _registry
    if _registry is None:
        registry: Registry[DatasetFormat] = Registry("dataset format", group=FORMAT_GROUP, expects=DatasetFormat,
                                                     describe=lambda f: (f.summary, ""), name_of=lambda f: f.name)
        registry.add(PickleRelease.kind, DatasetFormat(PickleRelease.kind, "CIFAR's python-pickle batches "
                                                       "(unpickled without running code)", _decode_pickles))
        registry.add(IdxRelease.kind, DatasetFormat(IdxRelease.kind, "LeCun's IDX files, gzipped or not "
                                                    "(MNIST, Fashion-MNIST)", _decode_idx))
        _registry = registry
    return _registry
