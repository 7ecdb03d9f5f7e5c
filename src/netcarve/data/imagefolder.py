"""Users' own images: ``root/<class_name>/*.png|jpg|jpeg|bmp`` (registered as data set ``imagefolder``).

``data_dir`` either has ``train/`` plus ``test/`` (or ``val/``) subfolders, each holding one folder per
class, or is itself a flat folder of class folders, which then serves as both splits (so the "test"
accuracy is measured on the training images). Class names are the sorted folder names of the train
folder; label ``i`` is ``classes[i]``. Every image is converted to RGB (``channels=3``) or grey
(``channels=1``) and resized (bilinear, aspect ratio not kept) to ``image_size``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..paths import PathLike
from .datasets import Dataset, register_dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def split_folders(root: PathLike) -> tuple[Path, Path]:
    """``(train_folder, test_folder)`` of an image-folder root (see the module docstring)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist")
    train = root / "train"
    if train.is_dir():
        for name in ("test", "val"):
            if (root / name).is_dir():
                return train, root / name
        raise DataError(f"image folder {root} has train/ but neither test/ nor val/")
    return root, root


def load_image_folder(
    folder: PathLike,
    image_size: int | tuple[int, int] = 32,
    channels: int = 3,
    classes: list[str] | tuple[str, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Read ``folder/<class>/<image>`` -> ``(x uint8 (N, C, H, W), y int64 (N,), classes)``.

    ``classes`` fixes the label order (e.g. the train classes when reading the test folder); a class
    folder not in it is an error, a class of it without a folder simply has no samples here.

    Raises:
        DataError: no class folders, a class folder without images, or an unreadable image (named).
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if h <= 0 or w <= 0:
        raise ConfigError(f"image_size must be positive, got {image_size}")
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    mode = "RGB" if channels == 3 else "L"
    dirs = _class_dirs(folder)
    if not dirs:
        raise DataError(
            f"image folder {folder} has no class folders; expected {folder}/<class_name>/*"
            f"{'|'.join(IMAGE_EXTENSIONS)}"
        )
    if classes is None:
        classes = tuple(d.name for d in dirs)
    index = {c: i for i, c in enumerate(classes)}
    files: list[tuple[Path, int]] = []
    for d in dirs:
        if d.name not in index:
            raise DataError(f"class folder {d} is not one of the training classes {list(classes)}")
        imgs = _image_files(d)
        if not imgs:
            raise DataError(f"class folder {d} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += [(p, index[d.name]) for p in imgs]
    x = np.empty((len(files), h, w, channels), dtype=np.uint8)
    for i, (p, _) in enumerate(files):
        try:
            with Image.open(p) as im:
                im = im.convert(mode)
                if im.size != (w, h):
                    im = im.resize((w, h), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {p}: {type(e).__name__}: {e}") from None
        x[i] = arr.reshape(h, w, channels)
    y = torch.tensor([c for _, c in files], dtype=torch.int64)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), y, tuple(classes)


@register_dataset("imagefolder", kind="image")
def imagefolder(
    split: str = "train",
    data_dir: PathLike | None = None,
    image_size: int | tuple[int, int] = 32,
    channels: int = 3,
) -> Dataset:
    """Your own images: data_dir/{train,test|val}/<class>/*.png|jpg|jpeg|bmp (or a flat class folder)."""
    if data_dir is None or str(data_dir) == "":
        raise ConfigError(
            "dataset 'imagefolder' needs data_dir (--data-dir DIR): a folder with train/ and test/ (or val/) "
            "subfolders of class folders, or one folder of class folders"
        )
    train_dir, test_dir = split_folders(data_dir)
    train_dirs = _class_dirs(train_dir)
    classes = tuple(d.name for d in train_dirs) or None
    folder = train_dir if split == "train" else test_dir
    x, y, classes = load_image_folder(folder, image_size, channels, classes)
    return Dataset(
        name="imagefolder",
        split=split,
        x=x,
        y=y,
        classes=classes,
        kind="image",
        channels=channels,
        value_range=(0.0, 255.0),
        source=str(folder),
    )
