"""ImageNet-style image folders: a recursive scan, labels from the first-level sub-folders, and a
decoder that turns every image mode into 8-bit RGB or says why it cannot.

Layout: ``root/<class>/**/<image>``; extensions .jpg .jpeg .png .webp in any case. Classes are the
sorted names of the first-level sub-folders that hold images (at any depth); the label of an image
is its class's index. A folder without sub-folders is one unlabelled class (every label 0). When
there are class folders, images lying directly in ``root`` belong to none and are left out with a
warning that counts them (as torchvision's ImageFolder leaves them out, but not silently). A
sub-folder that cannot be read (permissions, I/O error) is left out with a warning naming it. The
order is the sorted relative paths (by path components), the same on every machine and every run.
Symbolic links to folders are followed (each real folder visited once).

Decoding (``load_rgb``): the whole image is decoded inside the call (``Image.load``), so a
truncated file raises here rather than later or never. Pillow's global ``LOAD_TRUNCATED_IMAGES``
is left as it is (False unless someone else set it: then truncated JPEGs decode with grey bottoms,
and ``load_rgb`` warns once). Mode conversion: L, 1, CMYK, YCbCr, P -> RGB by Pillow; 16-bit
greyscale (I;16*) is scaled by 255/65535 (Pillow's own ``convert`` would clip it to white); 32-bit
I is scaled the same way when its values exceed 255; images with alpha (RGBA, LA, PA, P or L or RGB
with a transparency entry) are composited over white. EXIF orientation is not applied
(torchvision does not apply it either, and the DALI loader computes the same crop windows on the
stored size). Whatever fails to decode raises; the loader substitutes the next image and counts it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile

log = logging.getLogger(__name__)

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited over white
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_warned_truncated_flag = False


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in EXTENSIONS


def _walk(root: Path, unreadable: list[OSError] | None = None):
    """(relative directory parts, file names) of every folder under ``root``, links followed once.
    Folders that cannot be listed are skipped; their errors go to ``unreadable`` when given."""
    seen: set[str] = set()
    onerror = unreadable.append if unreadable is not None else None
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=onerror):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link cycle, or a second link to a folder already scanned
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        yield (() if rel == "." else tuple(Path(rel).parts)), filenames


def first_image(root: str | Path) -> Path | None:
    """Some image file under ``root`` (the first met), or None: a cheap non-empty check."""
    for parts, names in _walk(Path(root)):
        for name in sorted(names):
            if _is_image_name(name):
                return Path(root, *parts, name)
    return None


def require_dir(root: Path) -> None:
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} is not a directory")


def no_images_message(root: Path) -> str:
    msg = f"image folder {root} holds no images ({', '.join(EXTENSIONS)}, any case, at any depth)"
    if any(p.suffix == ".tar" for p in root.iterdir()):
        msg += "; for webdataset shards, keep only the .tar files (and their index files) at its top level"
    return msg


def _scan(root: Path, known: list[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """(relative paths with os.sep, labels, classes) in the deterministic order; see ``scan_folder``.
    ``known``: the class list labels index into (a split's and its siblings'), when given."""
    require_dir(root)
    unreadable: list[OSError] = []
    rel: list[tuple[str, ...]] = [
        (*parts, name) for parts, names in _walk(root, unreadable) for name in names if _is_image_name(name)
    ]
    if unreadable:
        log.warning(
            "%s: %d folder(s) could not be read and are left out: %s",
            root,
            len(unreadable),
            "; ".join(f"{err.filename} ({err.strerror or err})" for err in unreadable),
        )
    if not rel:
        raise FileNotFoundError(no_images_message(root))
    rel.sort()
    classes = sorted({r[0] for r in rel if len(r) > 1})
    if classes:
        loose = sum(1 for r in rel if len(r) == 1)
        if loose:
            log.warning(
                "%s: %d image(s) lie directly in the root, outside the %d class folders, and are left out",
                root,
                loose,
                len(classes),
            )
            rel = [r for r in rel if len(r) > 1]
    if classes and known:
        if len(classes) < len(known):
            log.info(
                "%s: %d of the %d classes of its sibling splits; labels follow all %d",
                root,
                len(classes),
                len(known),
                len(known),
            )
        classes = known
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[r[0]] if classes else 0 for r in rel]
    return [os.sep.join(r) for r in rel], labels, classes


def scan_folder(root: str | Path, as_str: bool = False) -> tuple[list, list[int], list[str]]:
    """(paths, labels, class names) of the images under ``root``, in the deterministic order.

    Paths are ``Path`` objects, or ``str`` with ``as_str`` (much cheaper at ImageNet's scale:
    ``python -m profiling.bench_choices`` times both). FileNotFoundError naming
    ``root`` when it is missing, not a directory, or holds no image.
    """
    root = Path(root)
    rel, labels, classes = _scan(root)
    prefix = os.path.join(os.fspath(root), "")
    paths = [prefix + r for r in rel]
    return (paths if as_str else [Path(p) for p in paths]), labels, classes


def _sixteen_to_eight(arr: np.ndarray) -> Image.Image:
    """[H, W] integers on a 0..65535 scale -> 8-bit greyscale, rounded (65535 -> 255, 257k -> k)."""
    arr = np.clip(arr.astype(np.int64), 0, 65535)
    return Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded Pillow image -> 8-bit RGB (see the module docstring for each mode)."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _SIXTEEN_BIT:
        return _sixteen_to_eight(np.asarray(img)).convert("RGB")
    if img.mode == "I":
        arr = np.asarray(img)
        return (
            _sixteen_to_eight(arr)
            if arr.max(initial=0) > 255
            else Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        ).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(source: str | Path | BinaryIO) -> Image.Image:
    """Decode ``source`` (a path or a binary file object) completely and convert it to 8-bit RGB.

    Raises (OSError, ValueError, SyntaxError, DecompressionBombError, struct.error, ...) for a file
    that is truncated, corrupt, empty or not an image.
    """
    global _warned_truncated_flag
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated_flag:
        _warned_truncated_flag = True
        log.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by some other code: truncated images "
            "now decode (padded) instead of being skipped and counted"
        )
    with Image.open(source) as img:
        img.load()  # the full decode: a truncated file fails here
        return to_rgb(img)


class _PathTable:
    """Many relative paths in one bytes object plus offsets: no per-path Python objects, so forked
    DataLoader workers share it without copy-on-write growth from reference counting."""

    def __init__(self, root: Path, rel: list[str]):
        self.prefix = os.path.join(os.fspath(root), "")
        encoded = [os.fsencode(r) for r in rel]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])
        self.blob = b"".join(encoded)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        if not -len(self) <= i < len(self):
            raise IndexError(f"path index {i} out of range for {len(self)} paths")
        i %= len(self)
        return self.prefix + os.fsdecode(self.blob[self.offsets[i] : self.offsets[i + 1]])


class ImageFolderDataset:
    """The images of a folder: ``ds[i] -> (PIL RGB image, label)``; ``labels`` [N] int64.

    An undecodable file raises from ``ds[i]`` (``load_rgb``); the pretraining loader substitutes the
    next index and counts the skip.
    """

    def __init__(self, root: str | Path, classes: list[str] | None = None):
        self.root = Path(root)
        rel, labels, self.classes = _scan(self.root, classes)
        self.paths = _PathTable(self.root, rel)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return load_rgb(self.paths[i]), int(self.labels[i])

    def read_bytes(self, i: int) -> bytes:
        """Image i's file as it is on disk (for decoders that choose their scale from the header)."""
        with open(self.paths[i], "rb") as fh:
            return fh.read()

    def describe(self, i: int) -> str:
        return self.paths[i]
