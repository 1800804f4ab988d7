"""Where the CPU loaders' images come from: the raw dataset a ``DataConfig`` names (IDX files, an image
folder, webdataset tars), the cheap check that it exists before any model is built, and reading an
item with the next decodable one standing in for an undecodable file (pretraining and evaluation
alike)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from ijepa_fast.data.errors import DataSourceError, no_decodable_image
from ijepa_fast.data.folder import ImageFolderDataset, first_image, no_images_message, require_dir
from ijepa_fast.data.idx import IdxDataset, check_idx_pair
from ijepa_fast.data.wds import WebdatasetSource, webdataset_tars

if TYPE_CHECKING:
    from ijepa_fast.config import DataConfig

# After this many undecodable files in a row the data source is taken to be unreadable (a lost
# mount, a wrong format) and the loader raises instead of scanning the whole dataset per sample.
MAX_CONSECUTIVE_BAD = 1000


class Source(Protocol):
    """A raw dataset: ``IdxDataset``, ``ImageFolderDataset`` or ``WebdatasetSource``."""

    root: Path

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> tuple[Any, int]: ...
    def describe(self, i: int) -> str: ...


# Sub-folders that mark a root as split: a split asked for and missing there is a mistake, which
# read as the root's own class folders would mix every split into one set labelled by split name.
SPLIT_FOLDERS = ("train", "val", "valid", "validation", "test")


def folder_root(cfg: DataConfig) -> Path:
    """``root/split`` when that sub-folder exists (the ImageNet layout), else ``root`` itself, whose
    class folders are then the data. FileNotFoundError when the split is missing from a root that
    holds other split folders."""
    root = Path(cfg.root)
    if not cfg.split or (root / cfg.split).is_dir():
        return root / cfg.split if cfg.split else root
    splits = [name for name in SPLIT_FOLDERS if (root / name).is_dir()]
    if splits:
        raise FileNotFoundError(
            f"split folder {root / cfg.split} does not exist; {root} is split into {', '.join(splits)}: "
            "name one of them as the split"
        )
    return root


def split_classes(cfg: DataConfig) -> list[str] | None:
    """The class folders of every split beside ``root/split`` (their sorted union), so that a class
    has one label in every split even where a split lacks some classes; None for a root read whole."""
    root = Path(cfg.root)
    if not cfg.split or not (root / cfg.split).is_dir():
        return None
    splits = [d for d in root.iterdir() if d.is_dir()]
    return sorted({c.name for d in splits for c in d.iterdir() if c.is_dir()})


def check_data_source(cfg: DataConfig) -> None:
    """Raise, naming the path, when the data source of a DataConfig is missing or empty.

    Cheap (IDX: the two headers; folder: stops at the first image), so the trainer calls it before
    building any model. FileNotFoundError for a missing or empty source, ``IdxFormatError`` (a
    ValueError) for IDX files that are not IDX.
    """
    if not cfg.root:
        raise FileNotFoundError("data.root is empty: point it at a folder of IDX files or of images")
    if not Path(cfg.root).exists():
        raise FileNotFoundError(f"data.root={cfg.root} does not exist")
    if cfg.dataset == "idx":
        check_idx_pair(cfg.root, cfg.split or "train")
        return
    if webdataset_tars(cfg):
        return
    root = folder_root(cfg)
    require_dir(root)
    if first_image(root) is None:
        raise FileNotFoundError(no_images_message(root))


def open_source(cfg: DataConfig, split: str | None = None) -> Source:
    """The raw dataset (``IdxDataset``, ``WebdatasetSource`` or ``ImageFolderDataset``) of a
    DataConfig, for ``split`` (default ``cfg.split``)."""
    if split is not None:
        cfg = dataclasses.replace(cfg, split=split)
    if cfg.dataset == "idx":
        return IdxDataset(cfg.root, cfg.split or "train")
    tars = webdataset_tars(cfg)
    return WebdatasetSource(tars) if tars else ImageFolderDataset(folder_root(cfg), split_classes(cfg))


def as_pil(item: Any) -> Image.Image:
    """IDX arrays [H, W] uint8 -> an L image (cropped in one channel, repeated to RGB later: the
    same bytes as cropping its RGB conversion, at a third of the work)."""
    return Image.fromarray(np.ascontiguousarray(item)) if isinstance(item, np.ndarray) else item


def load_with_substitutes(
    source: Source, n: int, index: int, load: Callable[[int], tuple[Any, int]] | None = None
) -> tuple[int, Any, int, str]:
    """(index used, image, label, "" or "path (error)" of ``index``'s own file): ``index`` if it
    decodes, else the next decodable index, wrapping around. ``load(i) -> (image, label)`` reads
    item i (default: ``source[i]``)."""
    load = load or source.__getitem__
    bad = ""
    for tries in range(min(n, MAX_CONSECUTIVE_BAD)):
        i = (index + tries) % n
        try:
            img, label = load(i)
        except Exception as err:  # any failure of a malformed file (OSError, SyntaxError, struct.error, ...)
            if tries == 0:
                bad = f"{source.describe(i)} ({type(err).__name__}: {err})"
            continue
        return i, img, label, bad
    if n <= MAX_CONSECUTIVE_BAD:
        raise no_decodable_image(source.root, n, bad)
    raise DataSourceError(
        f"{source.root}: {MAX_CONSECUTIVE_BAD} images in a row from {source.describe(index)} cannot be decoded "
        f"(first: {bad}); is the data source readable?"
    )
