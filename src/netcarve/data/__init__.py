"""Data sets, tensor augmentation and loaders.

Registered data sets (``list_datasets()``): ``digits`` / ``digits-rows`` (built in, no data directory),
``cifar10`` / ``cifar10-rows`` (npz or official pickle layout under the data root) and ``imagefolder``
(your own images). See :mod:`netcarve.data.datasets` for the tensor layouts.
"""

from ..paths import ENV_VAR, resolve_data_root
from .cifar import CIFAR10_CLASSES, find_cifar10, read_cifar10_npz, read_cifar10_pickle
from .datasets import (
    Dataset,
    DatasetInfo,
    get_dataset,
    get_dataset_info,
    list_datasets,
    register_dataset,
    to_rows,
)
from .digits import digits_split_indices
from .imagefolder import IMAGE_EXTENSIONS, load_image_folder
from .loader import BatchLoader, make_loaders
from .transforms import Compose, Normalize, RandomCrop, RandomHorizontalFlip, make_transform

__all__ = [
    "BatchLoader",
    "CIFAR10_CLASSES",
    "Compose",
    "Dataset",
    "DatasetInfo",
    "ENV_VAR",
    "IMAGE_EXTENSIONS",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "digits_split_indices",
    "find_cifar10",
    "get_dataset",
    "get_dataset_info",
    "list_datasets",
    "load_image_folder",
    "make_loaders",
    "make_transform",
    "read_cifar10_npz",
    "read_cifar10_pickle",
    "register_dataset",
    "resolve_data_root",
    "to_rows",
]
