"""Data fixtures of the tests: IDX files written byte by byte (independently of ``ijepa_fast.data.idx``)
and image folders with planted awkward and bad files, made of the photo-like images of
``ijepa_fast.data.synthetic``.

    planted = make_planted_folder(tmp_path / "data")
    planted.n_files, planted.n_bad, planted.bad  # 17 files, 3 undecodable: their relative paths
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ijepa_fast.data.synthetic import encode, synthetic_photo

# ----------------------------------------------------------------------------- IDX


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file's bytes for a uint8 array (magic 00 00 08 <ndim>, big-endian dims, data)."""
    assert array.dtype == np.uint8
    return struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape) + array.tobytes()


def write_idx_pair(
    root: Path, images: np.ndarray, labels: np.ndarray, split: str = "train", gz: bool = True
) -> tuple[Path, Path]:
    """``<prefix>-images-idx3-ubyte[.gz]`` and labels under ``root`` (prefix train|t10k)."""
    root.mkdir(parents=True, exist_ok=True)
    prefix = {"train": "train", "test": "t10k"}[split]
    out = []
    for kind, ext, array in (("images", "idx3-ubyte", images), ("labels", "idx1-ubyte", labels)):
        path = root / f"{prefix}-{kind}-{ext}{'.gz' if gz else ''}"
        data = idx_bytes(np.asarray(array, dtype=np.uint8))
        path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
        out.append(path)
    return out[0], out[1]


def random_idx_pair(
    root: Path, n: int, split: str = "train", gz: bool = True, size: int = 28, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Random [n, size, size] images and [n] labels in 0..9 written as an IDX pair; returns them."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    write_idx_pair(root, images, labels, split, gz)
    return images, labels


# ----------------------------------------------------------------------------- image folders


@dataclass
class PlantedFolder:
    """What ``make_planted_folder`` wrote; paths are relative to ``root`` with '/' separators."""

    root: Path
    good: list[str] = field(default_factory=list)  # ordinary RGB JPEGs
    awkward: list[str] = field(default_factory=list)  # decodable, in a mode other than 8-bit RGB
    bad: list[str] = field(default_factory=list)  # undecodable

    @property
    def n_files(self) -> int:
        return len(self.good) + len(self.awkward) + len(self.bad)

    @property
    def n_bad(self) -> int:
        return len(self.bad)

    def write(self, rel: str, data: bytes, kind: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        getattr(self, kind).append(rel)


def make_planted_folder(root: Path, size: tuple[int, int] = (64, 48), good_per_class: int = 3) -> PlantedFolder:
    """Two classes (cats, dogs) of good JPEGs plus every awkward kind and three undecodable files.

    Awkward: CMYK JPEG, greyscale JPEG, RGBA PNG, LA PNG, 16-bit greyscale PNG, palette PNG, palette
    PNG with a transparent index, WebP, an upper-case .JPG in a nested folder. Bad: a truncated JPEG
    (first half of a valid one), a zero-byte .jpg, and a text file named .jpg; the last two are
    neighbours in the sorted order (a bad file right after a bad file).
    """
    w, h = size
    p = PlantedFolder(root)
    photo = lambda s: synthetic_photo(w, h, seed=s)  # noqa: E731
    for i in range(good_per_class):
        p.write(f"cats/good{i}.jpg", encode(photo(i)), "good")
        p.write(f"dogs/good{i}.jpg", encode(photo(100 + i)), "good")
    p.write("cats/cmyk.jpg", encode(Image.fromarray(photo(10)).convert("CMYK")), "awkward")
    p.write("cats/rgba.png", encode(Image.fromarray(photo(11)).convert("RGBA"), "PNG"), "awkward")
    p.write("cats/la.png", encode(Image.fromarray(photo(12)).convert("LA"), "PNG"), "awkward")
    p.write("cats/deep/nested/UPPER.JPG", encode(photo(13)), "awkward")
    p.write("dogs/deep16.png", encode(Image.fromarray(photo(14)[..., 0].astype(np.uint16) * 257), "PNG"), "awkward")
    p.write("dogs/gray.jpg", encode(Image.fromarray(photo(15)).convert("L")), "awkward")
    p.write("dogs/palette.png", encode(Image.fromarray(photo(16)).convert("P"), "PNG"), "awkward")
    p.write("dogs/palette_alpha.png", encode(Image.fromarray(photo(17)).convert("P"), "PNG", transparency=0), "awkward")
    p.write("dogs/photo.webp", encode(photo(18), "WEBP"), "awkward")
    full = encode(photo(19))
    p.write("cats/truncated.jpg", full[: len(full) // 2], "bad")
    p.write("dogs/empty.jpg", b"", "bad")
    p.write("dogs/empty_text.jpg", b"this is a text file, not a JPEG\n", "bad")
    return p
