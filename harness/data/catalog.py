"""The datasets harness knows: shapes, class names, official archive layout, download and mirror names."""

from __future__ import annotations

from dataclasses import dataclass

from harness.errors import UsageError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset; ``classes`` are in the order of the integer labels."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    classes: tuple[str, ...]


@dataclass(frozen=True)
class OfficialLayout:
    """The official python-pickle release: which files make each split and where labels/names are."""

    folder: str  # folder inside the archive, e.g. "cifar-10-batches-py"
    files: dict[str, tuple[str, ...]]  # split -> pickle file names, in order
    label_key: str
    meta_file: str
    names_key: str

    def all_files(self) -> set[str]:
        return {f for names in self.files.values() for f in names} | {self.meta_file}


@dataclass(frozen=True)
class CatalogEntry:
    info: DatasetInfo
    official: OfficialLayout
    url: str
    md5: str
    mirror_names: tuple[str, ...]  # file/folder names looked for in $HARNESS_DATA_MIRROR, preferred first


_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                    "dog", "frog", "horse", "ship", "truck")

_CATALOG = {
    "cifar10": CatalogEntry(
        info=DatasetInfo("cifar10", 10, (3, 32, 32), _CIFAR10_CLASSES),
        official=OfficialLayout(
            folder="cifar-10-batches-py",
            files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
            label_key="labels", meta_file="batches.meta", names_key="label_names"),
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        mirror_names=("cifar-10-python.tar.gz", "cifar-10-batches-py", "cifar10-jpeg.tar.gz", "cifar10"),
    ),
    # Generic class names here; the official names are taken from the `meta` file at import.
    "cifar100": CatalogEntry(
        info=DatasetInfo("cifar100", 100, (3, 32, 32), tuple(f"class_{i:02d}" for i in range(100))),
        official=OfficialLayout(
            folder="cifar-100-python", files={"train": ("train",), "test": ("test",)},
            label_key="fine_labels", meta_file="meta", names_key="fine_label_names"),
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        mirror_names=("cifar-100-python.tar.gz", "cifar-100-python", "cifar100-jpeg.tar.gz", "cifar100"),
    ),
}


def dataset_names() -> list[str]:
    return list(_CATALOG)


def catalog_entry(name: str) -> CatalogEntry:
    """The entry for ``name``; UsageError listing the valid names if unknown."""
    try:
        return _CATALOG[name]
    except KeyError:
        raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(_CATALOG)}") from None


def dataset_info(name: str) -> DatasetInfo:
    """Static info of ``name``. For names recorded at import (e.g. CIFAR-100's), use ``Split.info``."""
    return catalog_entry(name).info


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return split
