"""ImageNet-style image folders: recursive scan, labels from the first-level sub-folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def scan_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """(paths, labels, class names), sorted; labels index the sorted first-level sub-folders
    (images directly in ``root`` get label 0 when there are no sub-folders)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not paths:
        raise FileNotFoundError(f"image folder {root} holds no images ({', '.join(EXTENSIONS)})")
    classes = sorted({p.relative_to(root).parts[0] for p in paths if len(p.relative_to(root).parts) > 1})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index.get(p.relative_to(root).parts[0], 0) if len(p.relative_to(root).parts) > 1 else 0
              for p in paths]
    return paths, labels, classes


def load_rgb(path: str | Path) -> Image.Image:
    """Decode fully (truncation is detected here) and convert any mode to 8-bit RGB.

    16-bit greyscale is scaled to 8 bits (not clipped); alpha is composited on black, as dropping it.
    Raises OSError / ValueError / SyntaxError for undecodable files.
    """
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64)
            peak = 65535.0 if arr.max() > 255 else 255.0
            return Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).astype(np.uint8)).convert("RGB")
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return img.convert("RGB")


class ImageFolderDataset:
    """``ds[i] -> (PIL RGB image, label)``; undecodable files raise (the loader skips and counts them)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.paths, self.labels, self.classes = scan_folder(root)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return load_rgb(self.paths[i]), self.labels[i]
