"""Decoding an ImageFolder (``train/<class>/*``, ``test/<class>/*`` or ``val/<class>/*``) block by block.

Sample order: class by class in label order, and within a class the files sorted by name, digit runs
compared as numbers (``2.png`` before ``10.png``; zero-padded names sort the same either way). Class
folders whose names all match the dataset's class names (case-insensitive, ignoring punctuation and
spaces, so ``T-shirt_top`` is ``T-shirt/top``) get the standard labels (a subset of the classes is
allowed); otherwise there must be exactly ``num_classes`` folders, labelled in sorted order (same
rule). An ImageFolder copy is therefore ordered by class, not in the official sample order.

Images must have the dataset's size, unless the dataset resizes at import (ImageNet: shorter side to
256, bilinear, then a centre crop of 224). Images are read and decoded in blocks (by a process pool
for large folders), so only a block of them is in memory at a time.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from harness.data.catalog import SPLITS, DatasetInfo, ResizeCrop
from harness.core.errors import UsageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val")}  # split -> folder names that hold it
_POOL_MIN_IMAGES = 4096  # below this a process pool costs more than it saves
_CHUNK = 1000  # images per block at most
_CHUNK_BYTES = 32 << 20  # and at most this many decoded bytes per block

Blocks = Iterator[np.ndarray]  # uint8 (n, C, H, W) blocks in sample order


def natural_key(name: str) -> tuple:
    """Sort key comparing digit runs as numbers: ``img2`` < ``img10``."""
    return tuple((0, int(t), t) if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)


def is_image(path: PurePosixPath) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _split_of(path: PurePosixPath) -> str | None:
    """The split an image at ``<split folder>/<class>/<file>`` belongs to, if any."""
    if len(path.parts) < 3:
        return None
    return next((s for s, folders in SPLIT_FOLDERS.items() if path.parts[-3] in folders), None)


def _class_key(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _class_labels(info: DatasetInfo, folders: set[str]) -> tuple[dict[str, int], tuple[str, ...]]:
    """Label of each class folder, and the class names of the dataset (see the module docstring)."""
    standard = {_class_key(c): i for i, c in enumerate(info.classes)}
    if all(_class_key(f) in standard for f in folders):
        return {f: standard[_class_key(f)] for f in folders}, info.classes
    if len(folders) != info.num_classes:
        raise UsageError(
            f"found {len(folders)} class folders ({', '.join(sorted(folders, key=natural_key)[:12])}...) "
            f"whose names are not all {info.name} class names; name the folders after the classes "
            f"({', '.join(info.classes[:10])}...) or provide exactly {info.num_classes} folders")
    ordered = tuple(sorted(folders, key=natural_key))
    return {f: i for i, f in enumerate(ordered)}, ordered


def decode_imagefolder(info: DatasetInfo, files: Mapping[PurePosixPath, bytes], resize: ResizeCrop | None,
                       progress: bool) -> tuple[dict[str, tuple[np.ndarray, Blocks]], tuple[str, ...]] | None:
    """``split -> (labels, image blocks)`` and the class names, or None if ``files`` hold no ImageFolder.

    The blocks read ``files`` lazily: consume them while ``files`` is still open.
    """
    members = {p: _split_of(p) for p in files if is_image(p)}
    members = {p: s for p, s in members.items() if s is not None}
    if not members:
        return None
    roots = {p.parents[2] for p in members}
    if len(roots) > 1:
        raise UsageError(f"found several ImageFolder trees ({', '.join(sorted(map(str, roots)))}); "
                         f"import one folder holding train/ and test/ (or val/)")
    for split in SPLITS:
        used = sorted({p.parts[-3] for p, s in members.items() if s == split})
        if not used:
            raise UsageError(f"ImageFolder has no {' or '.join(f'{f}/<class>/' for f in SPLIT_FOLDERS[split])} "
                             f"images; both train and test (or val) are needed")
        if len(used) > 1:
            raise UsageError(f"ImageFolder has both {' and '.join(used)}/ folders for the {split} split; "
                             f"import a folder holding only one of them")
    labels_of, classes = _class_labels(info, {p.parts[-2] for p in members})
    splits = {}
    for split in SPLITS:
        ordered = sorted((p for p, s in members.items() if s == split),
                         key=lambda p: (labels_of[p.parts[-2]], natural_key(p.name), p.parts[-2]))
        labels = np.array([labels_of[p.parts[-2]] for p in ordered], dtype=np.int64)
        splits[split] = (labels, decode_images(ordered, files, info.image_shape, resize, progress,
                                               desc=f"decoding {split}"))
    return splits, classes


def _resize_crop(im: Image.Image, resize: ResizeCrop) -> Image.Image:
    """Shorter side to ``resize.shorter`` (bilinear, as torchvision's ``Resize``), then a centre crop."""
    w, h = im.size
    s = resize.shorter
    size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    im = im.resize(size, Image.BILINEAR)
    left, top = round((size[0] - resize.crop) / 2), round((size[1] - resize.crop) / 2)
    return im.crop((left, top, left + resize.crop, top + resize.crop))


def _decode_chunk(args: tuple[list[tuple[str, bytes]], tuple[int, int, int], ResizeCrop | None]) -> np.ndarray:
    blobs, (c, h, w), resize = args
    mode = "RGB" if c == 3 else "L"
    out = np.empty((len(blobs), h, w, c), dtype=np.uint8)
    for i, (name, blob) in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(blob)) as im:
                im = im if im.mode == mode else im.convert(mode)
                if resize is not None:
                    im = _resize_crop(im, resize)
                if im.size != (w, h):
                    raise UsageError(f"image {name} is {im.size[0]}x{im.size[1]}, expected {w}x{h}")
                out[i] = np.asarray(im).reshape(h, w, c)
        except UsageError:
            raise
        except UnidentifiedImageError:
            raise UsageError(f"cannot decode image {name}: not an image file (PIL reads PNG, JPEG and the "
                             f"other formats it knows); the archive may be damaged or not an ImageFolder") from None
        except Exception as exc:
            raise UsageError(f"cannot decode image {name}: {exc}; the file may be truncated or damaged") from None
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def decode_images(names: Sequence[PurePosixPath], files: Mapping[PurePosixPath, bytes],
                  shape: tuple[int, int, int], resize: ResizeCrop | None = None, progress: bool = True,
                  desc: str = "decoding") -> Blocks:
    """Decode ``files[name]`` for ``names`` in order, yielding uint8 (n, C, H, W) blocks.

    Files are read block by block; large batches are decoded by a process pool (one worker per CPU),
    a few blocks at a time.
    """
    per_block = max(1, min(_CHUNK, _CHUNK_BYTES // int(np.prod(shape))))
    starts = range(0, len(names), per_block)
    workers = min(os.cpu_count() or 1, len(starts))
    parallel = len(names) >= _POOL_MIN_IMAGES and workers > 1
    window = 2 * workers if parallel else 1

    def task(start: int) -> tuple[list[tuple[str, bytes]], tuple[int, int, int], ResizeCrop | None]:
        return [(str(n), files[n]) for n in names[start:start + per_block]], shape, resize

    with tqdm(total=len(names), desc=desc, unit="img", disable=not progress) as bar, \
            (multiprocessing.Pool(workers) if parallel else contextlib.nullcontext()) as pool:
        for first in range(0, len(starts), window):
            tasks = [task(s) for s in starts[first:first + window]]
            for block in pool.map(_decode_chunk, tasks) if parallel else map(_decode_chunk, tasks):
                bar.update(len(block))
                yield block
