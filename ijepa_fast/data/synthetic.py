"""Photo-like synthetic images, for the data benchmark and the data tests (no dataset needed).

write_jpeg_folder(root, 256)  # 256 JPEGs of 500x375 in 4 class folders
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_photo(width: int = 64, height: int = 48, seed: int = 0) -> np.ndarray:
    """[height, width, 3] uint8: smooth colour gradients, a few discs and mild noise, so JPEG sizes
    and decode times resemble photographs' (pure noise compresses far worse, flat colour far better)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    img = np.stack([127 + 100 * np.sin(xx / width * (2 + c) + yy / height * (3 - c) + phase[c]) for c in range(3)], -1)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0.05, 0.3) * min(width, height)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(arr: np.ndarray | Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    (arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_jpeg_folder(
    root: Path, n: int, size: tuple[int, int] = (500, 375), classes: int = 4, seed: int = 0, quality: int = 90
) -> list[Path]:
    """``n`` photo-like JPEGs of ``size`` in ``classes`` class folders (for benchmarks)."""
    paths = []
    for i in range(n):
        path = root / f"class{i % classes:03d}" / f"img{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(synthetic_photo(*size, seed=seed + i), quality=quality))
        paths.append(path)
    return paths
