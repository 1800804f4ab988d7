"""IDX files (MNIST, Fashion-MNIST and their kin), gzipped or not.

An IDX file is a 4-byte magic number ``00 00 <type> <ndim>``, then ``ndim`` big-endian uint32
sizes, then the data in row-major order. Gzip is recognised by its own magic bytes (``1f 8b``), not
by the file name. A bad magic number, a header cut short and a body of the wrong length are
``IdxFormatError`` (a ValueError) naming the file.

``IdxDataset(root, split)`` finds ``train-images-idx3-ubyte[.gz]`` / ``t10k-images-idx3-ubyte[.gz]``
and the matching labels under ``root`` (also the ``train-images.idx3-ubyte`` spelling some mirrors
use); Debian's ``dataset-fashion-mnist`` installs them under /usr/share/datasets/fashion-mnist.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

# type byte -> element type (big-endian where it matters)
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
SPLIT_PREFIX = {"train": "train", "test": "t10k"}


class IdxFormatError(ValueError):
    """The file is not a well-formed IDX file; the message names it and what is wrong."""


def _read_bytes(path: Path, limit: int = -1) -> bytes:
    """The file's (decompressed) bytes, at most ``limit`` of them when ``limit >= 0``."""
    with open(path, "rb") as fh:
        gz = fh.read(2) == _GZIP_MAGIC
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as fh:
            return fh.read(limit)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise IdxFormatError(f"{path}: corrupt or truncated gzip stream ({type(err).__name__}: {err})") from None


def _parse_header(path: Path, raw: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """(element type, dims, header length) from the first bytes of an IDX file."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES or raw[3] == 0:
        raise IdxFormatError(
            f"{path} is not an IDX file: bad magic number {raw[:4].hex() or '(empty file)'} "
            "(expected 00 00 <type 08|09|0b|0c|0d|0e> <ndim >= 1>)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated header ({len(raw)} bytes, {ndim} dimensions need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    return _DTYPES[raw[2]], dims, header


def read_idx_header(path: str | Path) -> tuple[np.dtype, tuple[int, ...]]:
    """(element type, dims) of an IDX file, reading only its header."""
    path = Path(path)
    dtype, dims, _ = _parse_header(path, _read_bytes(path, 4 + 4 * 255))
    return dtype, dims


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (``.gz`` or not), shaped by its header, native byte order."""
    path = Path(path)
    raw = _read_bytes(path)
    dtype, dims, header = _parse_header(path, raw)
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        kind = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise IdxFormatError(
            f"{path} is {kind}: header says {dims} x {dtype.itemsize} bytes = {expected} bytes "
            f"of data, the file holds {len(raw) - header}"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False) if dtype.byteorder == ">" else array


def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file; gzipped when ``compress`` (default: when the name ends in .gz)."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    codes = {v.newbyteorder("="): k for k, v in _DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    body = array.astype(_DTYPES[code], copy=False).tobytes()
    data = struct.pack(f">BBBB{array.ndim}I", 0, 0, code, array.ndim, *array.shape) + body
    compress = path.suffix == ".gz" if compress is None else compress
    with gzip.open(path, "wb") if compress else open(path, "wb") as fh:
        fh.write(data)


def find_idx_pair(root: str | Path, split: str) -> tuple[Path, Path]:
    """The images and labels files of ``split`` (train|test) under ``root``; FileNotFoundError naming
    the directory and the names looked for when either is missing."""
    if split not in SPLIT_PREFIX:
        raise ValueError(f"IDX split {split!r} must be 'train' or 'test'")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"IDX directory {root} does not exist or is not a directory")
    found = []
    for kind, ext in (("images", "idx3-ubyte"), ("labels", "idx1-ubyte")):
        stems = [f"{SPLIT_PREFIX[split]}-{kind}-{ext}", f"{SPLIT_PREFIX[split]}-{kind}.{ext}"]
        candidates = [root / (stem + gz) for stem in stems for gz in ("", ".gz")]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise FileNotFoundError(f"no IDX file {stems[0]}[.gz] in {root}")
        found.append(hit)
    return found[0], found[1]


def check_idx_pair(root: str | Path, split: str) -> tuple[Path, Path]:
    """``find_idx_pair`` plus a header check of both files (cheap: no decompression of the body)."""
    images_path, labels_path = find_idx_pair(root, split)
    dtype, dims = read_idx_header(images_path)
    if dtype != np.uint8 or len(dims) != 3:
        raise IdxFormatError(f"{images_path}: expected uint8 images [N, H, W], header says {dtype} {dims}")
    _, ldims = read_idx_header(labels_path)
    if len(ldims) != 1 or ldims[0] != dims[0]:
        raise IdxFormatError(f"{labels_path}: expected {dims[0]} labels [N], header says {ldims}")
    return images_path, labels_path


class IdxDataset:
    """An IDX images/labels pair in memory: ``images`` [N, H, W] uint8, ``labels`` [N] int64.

    ``ds[i] -> (image [H, W] uint8 array, label int)``.
    """

    def __init__(self, root: str | Path, split: str = "train"):
        images_path, labels_path = check_idx_pair(root, split)
        self.root, self.split, self.images_path = Path(root), split, images_path
        self.images = read_idx(images_path)
        self.labels = read_idx(labels_path).astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])

    def describe(self, i: int) -> str:
        return f"{self.images_path}[{i}]"
