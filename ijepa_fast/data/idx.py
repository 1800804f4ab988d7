"""IDX files (MNIST, Fashion-MNIST), gzipped or not."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
           0x0E: np.dtype(">f8")}
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (``.gz`` read transparently); a bad header is a ValueError."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != expected:
        raise ValueError(f"{path} is truncated or padded: header says {dims} ({expected} bytes), file has {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def find_idx_pair(root: str | Path, split: str) -> tuple[Path, Path]:
    """The images and labels files of ``split`` (train|test) under ``root``."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"IDX split {split!r} must be 'train' or 'test'")
    root = Path(root)
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        stem = f"{_SPLIT_PREFIX[split]}-{kind}"
        candidates = [root / stem, root / f"{stem}.gz"]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise FileNotFoundError(f"no IDX file {stem}[.gz] in {root}")
        found.append(hit)
    return found[0], found[1]


class IdxDataset:
    """Images [N, H, W] uint8 and labels [N] from an IDX pair; ``ds[i] -> (image, label)``."""

    def __init__(self, root: str | Path, split: str = "train"):
        images_path, labels_path = find_idx_pair(root, split)
        self.images = read_idx(images_path)
        self.labels = read_idx(labels_path).astype(np.int64)
        if self.images.ndim != 3 or len(self.images) != len(self.labels):
            raise ValueError(f"{images_path}: expected images [N, H, W] matching {len(self.labels)} labels, "
                             f"got {self.images.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])
