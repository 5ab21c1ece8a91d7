"""Datasets (CIFAR-10/100, MNIST, Fashion-MNIST, ImageNet): import once into the data root, then load
splits as uint8 tensors.

See :mod:`harness.data.catalog` for the datasets, :mod:`harness.data.formats` for the accepted inputs,
:mod:`harness.data.imagefolder` for the ImageFolder sample order and :mod:`harness.data.disk` for the
on-disk layout.
"""

from harness.data.catalog import SPLITS, DatasetInfo, dataset_info, dataset_names
from harness.data.datasets import dataset_status, import_dataset, load_split
from harness.data.fetch import fetch_dataset
from harness.data.disk import Split

__all__ = ["SPLITS", "DatasetInfo", "Split", "dataset_info", "dataset_names", "load_split",
           "import_dataset", "fetch_dataset", "dataset_status"]
