"""Labelled webdataset shards on the CPU: the ``.tar`` files of a folder (sorted by name), each sample
an image (``KEY.jpg`` / ``.jpeg`` / ``.png`` / ``.webp``) and its class (``KEY.cls``: an integer as
text), for evaluation (``LabelledShards``: a ``data.sources.Source``). The members are indexed once
(names and offsets, no image read); an item is read from its offset in the tar."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from ijepa_fast.data.folder import load_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the name up to the first dot of its last path part."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return f"{folder}/{stem}" if folder else stem, f"{dot}{ext}".lower()


def index_shard(path: Path) -> list[tuple[int, int, int]]:
    """(image offset, image size, label) of every sample of one shard that has an image and a class."""
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split_key(member.name)
            if ext in IMAGE_SUFFIXES:
                images[key] = (member.offset_data, member.size)
            elif ext == ".cls":
                text = tar.extractfile(member).read().decode().strip()
                try:
                    labels[key] = int(text)
                except ValueError:
                    raise ValueError(f"{path}: {member.name} holds {text[:20]!r}, not a class number") from None
    return [(*images[k], labels[k]) for k in images if k in labels]


class LabelledShards:
    """``ds[i] -> (RGB PIL image, label)`` over the shards of ``root`` (a folder of ``.tar`` files, or
    one ``.tar``); ``labels`` [N] as in the other sources."""

    def __init__(self, root: str | Path):
        root = Path(root)
        shards = [root] if root.suffix == ".tar" else sorted(root.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"{root}: no .tar shards")
        self.items: list[tuple[Path, int, int]] = []  # (shard, offset, size)
        labels = []
        for shard in shards:
            for offset, size, label in index_shard(shard):
                self.items.append((shard, offset, size))
                labels.append(label)
        if not self.items:
            raise FileNotFoundError(f"{root}: no sample of its shards has both an image and a .cls label")
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        shard, offset, size = self.items[i]
        with open(shard, "rb") as fh:
            fh.seek(offset)
            return load_rgb(io.BytesIO(fh.read(size))), int(self.labels[i])

    def describe(self, i: int) -> str:
        shard, offset, _ = self.items[i]
        return f"{shard}@{offset}"
