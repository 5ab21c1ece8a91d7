"""The datasets harness knows: shapes, class names, official releases, download and mirror names.

An official release is either a python-pickle archive (CIFAR, :class:`PickleRelease`) or a set of
gzipped IDX files (MNIST, Fashion-MNIST, :class:`IdxRelease`); a dataset without a public download
(ImageNet) has none and is imported from an ImageFolder only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from harness.data.imagenet_classes import WNIDS
from harness.core.errors import UsageError
from harness.core.registry import suggest

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset; ``classes`` are in the order of the integer labels.

    ``mean``/``std`` are per-channel statistics for a classifier's input normalisation (None: the
    architecture's default); ``hflip`` says whether a horizontal flip keeps the label (not for digits).
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    classes: tuple[str, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    hflip: bool = True


@dataclass(frozen=True)
class PickleRelease:
    """A python-pickle release in one archive: which pickles make each split and where labels/names are."""

    url: str  # of the archive
    md5: str
    folder: str  # folder inside the archive, e.g. "cifar-10-batches-py"
    files: dict[str, tuple[str, ...]]  # split -> pickle file names, in order
    label_key: str
    meta_file: str
    names_key: str
    kind = "python pickle"

    def all_files(self) -> set[str]:
        return {f for names in self.files.values() for f in names} | {self.meta_file}

    def downloads(self) -> dict[str, str]:
        """File name -> md5 of what ``harness data fetch`` downloads."""
        return {self.url.rsplit("/", 1)[-1]: self.md5}


@dataclass(frozen=True)
class IdxRelease:
    """A release of gzipped IDX files (an images and a labels file per split) under one base URL."""

    base_url: str
    files: dict[str, tuple[str, str]]  # split -> (images file, labels file), names of the .gz files
    md5: dict[str, str]  # .gz file name -> md5
    kind = "IDX"

    def all_files(self) -> set[str]:
        return {f for pair in self.files.values() for f in pair}

    def downloads(self) -> dict[str, str]:
        return dict(self.md5)


Release = Union[PickleRelease, IdxRelease]


@dataclass(frozen=True)
class ResizeCrop:
    """Import-time preprocessing: resize the shorter side to ``shorter`` (bilinear), centre-crop ``crop``."""

    shorter: int
    crop: int

    def describe(self) -> str:
        return f"shorter side resized to {self.shorter} (bilinear), centre crop {self.crop}x{self.crop}"


@dataclass(frozen=True)
class CatalogEntry:
    info: DatasetInfo
    official: Release | None  # None: no public download, import an ImageFolder
    mirror_names: tuple[str, ...]  # file/folder names looked for in $HARNESS_DATA_MIRROR, preferred first
    resize: ResizeCrop | None = None  # applied to ImageFolder images (else they must have the exact size)
    how_to_get: str = ""  # for datasets without a public download


_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                    "dog", "frog", "horse", "ship", "truck")
_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _idx_release(base_url: str, md5: tuple[str, str, str, str]) -> IdxRelease:
    """The usual four MNIST-style files; ``md5`` in the order train images, train labels, test images, test labels."""
    files = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
    names = [f for pair in files.values() for f in pair]
    return IdxRelease(base_url=base_url, files=files, md5=dict(zip(names, md5)))


_CATALOG = {
    "cifar10": CatalogEntry(
        info=DatasetInfo("cifar10", 10, (3, 32, 32), _CIFAR10_CLASSES),
        official=PickleRelease(
            url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            md5="c58f30108f718f92721af3b95e74349a",
            folder="cifar-10-batches-py",
            files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
            label_key="labels", meta_file="batches.meta", names_key="label_names"),
        mirror_names=("cifar-10-python.tar.gz", "cifar-10-batches-py", "cifar10-jpeg.tar.gz", "cifar10"),
    ),
    # Generic class names here; the official names are taken from the `meta` file at import.
    "cifar100": CatalogEntry(
        info=DatasetInfo("cifar100", 100, (3, 32, 32), tuple(f"class_{i:02d}" for i in range(100))),
        official=PickleRelease(
            url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            md5="eb9058c3a382ffc7106e4002c42a8d85",
            folder="cifar-100-python", files={"train": ("train",), "test": ("test",)},
            label_key="fine_labels", meta_file="meta", names_key="fine_label_names"),
        mirror_names=("cifar-100-python.tar.gz", "cifar-100-python", "cifar100-jpeg.tar.gz", "cifar100"),
    ),
    # Normalisation: the 1-channel default of harness.classifiers.architectures (Fashion-MNIST's statistics).
    "fashion-mnist": CatalogEntry(
        info=DatasetInfo("fashion-mnist", 10, (1, 28, 28), _FASHION_CLASSES),
        official=_idx_release("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", (
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
            "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310")),
        mirror_names=("fashion-mnist",),
    ),
    "mnist": CatalogEntry(
        info=DatasetInfo("mnist", 10, (1, 28, 28), tuple(str(d) for d in range(10)),
                         mean=(0.1307,), std=(0.3081,), hflip=False),
        official=_idx_release("https://ossci-datasets.s3.amazonaws.com/mnist/", (
            "f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
            "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")),
        mirror_names=("mnist",),
    ),
    "imagenet": CatalogEntry(
        info=DatasetInfo("imagenet", 1000, (3, 224, 224), WNIDS,
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        official=None,
        mirror_names=("imagenet",),
        resize=ResizeCrop(256, 224),
        how_to_get="ImageNet (ILSVRC2012) has no public download: get it from image-net.org (registration "
                   "and terms of access), arrange it as train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, and run "
                   "`harness data import imagenet FOLDER`",
    ),
}


def dataset_names() -> list[str]:
    return list(_CATALOG)


def catalog_entry(name: str) -> CatalogEntry:
    """The entry for ``name``; UsageError listing the valid names if unknown."""
    try:
        return _CATALOG[name]
    except KeyError:
        raise UsageError(f"unknown dataset {name!r}{suggest(str(name), _CATALOG)}; "
                         f"valid: {', '.join(_CATALOG)}") from None


def dataset_info(name: str) -> DatasetInfo:
    """Static info of ``name``. For names recorded at import (e.g. CIFAR-100's), use ``Split.info``."""
    return catalog_entry(name).info


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}{suggest(str(split), SPLITS)}; valid: {', '.join(SPLITS)}")
    return split
