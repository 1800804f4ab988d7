"""Webdataset tar shards: the layout both loaders read, DALI's index files, and the CPU loader's source.

A webdataset sample is the run of consecutive tar members sharing a basename (the name up to the
first dot after the last '/'); its image is the first member with an image extension, its label an
optional ``.cls`` member holding a decimal integer. Data given as ``root`` (or ``root/split``) is
webdataset data when it is a .tar file, or a folder whose top level holds .tar files and no
sub-folders (``webdataset_tars``).

DALI's index files (what ``fn.readers.webdataset(index_paths=...)`` reads; the format of its
``wds2idx`` tool, v1.2): a first line ``v1.2 <number of samples>``, then one line per sample listing
its components as ``<ext> <offset of the member's data> <size> <member name>``, separated by spaces
(so names must hold no whitespace).

``WebdatasetSource`` gives the CPU loader random access to the samples (the tar offsets from one scan
of the headers), so tars train on the CPU path with the same sampler as image folders.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ijepa_fast.data.errors import DataSourceError
from ijepa_fast.data.folder import load_rgb

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class Component:
    offset: int  # of the member's data in the tar, a multiple of 512
    size: int
    name: str  # the member's name

    @property
    def ext(self) -> str:
        return split_name(self.name)[1]


@dataclass(frozen=True)
class WdsSample:
    key: str  # "<tar path>:<basename>", how bad samples are reported
    image: Component
    label: Component | None
    others: tuple[Component, ...] = ()  # the sample's other members


def webdataset_tars(cfg) -> list[Path]:
    """The tar shards when ``cfg`` (``root``, ``split``) points at webdataset data, else []."""
    root = Path(cfg.root)
    if cfg.split and (root / cfg.split).is_dir():
        root = root / cfg.split
    if root.is_file():
        return [root] if root.suffix == ".tar" else []
    if not root.is_dir():
        return []
    entries = list(root.iterdir())
    tars = sorted(p for p in entries if p.suffix == ".tar" and p.is_file())
    return tars if tars and not any(p.is_dir() for p in entries) else []


def split_name(name: str) -> tuple[str, str]:
    """(basename, extension) as DALI's webdataset reader splits a member name."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def scan_tar(path: str | Path) -> tuple[list[WdsSample], int]:
    """The samples of one tar that hold an image, in archive order, and how many were left out
    (no image member, or a name DALI's index format cannot hold). ``DataSourceError`` naming the
    shard when it is truncated or damaged."""
    groups: list[tuple[str, list[tarfile.TarInfo]]] = []
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isreg():
                    continue
                base, _ = split_name(member.name)
                if not base or base.endswith("/"):  # hidden files: DALI skips them too
                    continue
                if groups and groups[-1][0] == base:
                    groups[-1][1].append(member)
                else:
                    groups.append((base, [member]))
    except (tarfile.TarError, EOFError) as err:
        raise DataSourceError(
            f"webdataset shard {path} is truncated or damaged ({err}): re-create it, or move it out of the data folder"
        ) from None
    samples: list[WdsSample] = []
    left_out = 0
    for base, members in groups:
        image = label = None
        for m in members:
            ext = split_name(m.name)[1].lower()
            if image is None and ext in IMAGE_EXTS:
                image = m
            elif label is None and ext == "cls":
                label = m
        if image is None or any(c.isspace() for c in base + image.name + (label.name if label else "")):
            left_out += 1
            continue
        comp = lambda m: Component(m.offset_data, m.size, m.name)  # noqa: E731
        others = tuple(comp(m) for m in members if m is not image and m is not label)
        samples.append(WdsSample(f"{path}:{base}", comp(image), comp(label) if label else None, others))
    return samples, left_out


def read_member(path: str | Path, comp: Component) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(comp.offset)
        return fh.read(comp.size)


def index_text(samples: list[list[tuple[str, Component]]]) -> str:
    """DALI's index file for samples given as [(extension, component), ...] each."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {c.offset} {c.size} {c.name}" for ext, c in sample) for sample in samples]
    return "\n".join(lines) + "\n"


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``."""
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def parse_label(data: bytes) -> int:
    """A ``.cls`` member's integer (ASCII decimal, surrounding whitespace allowed); -1 when it is not one
    (what the DALI loader yields for it too)."""
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return -1


class WebdatasetSource:
    """The samples of webdataset tars for the CPU loader: ``src[i] -> (PIL RGB image, label)``, in
    tar order (label 0 for a sample without ``.cls``). An undecodable image raises from ``src[i]``;
    the loader substitutes the next sample and counts it, as for image folders. Offsets are held in
    arrays, not per-sample objects, so forked workers share them without copy-on-write growth."""

    def __init__(self, tars: list[str | Path]):
        self.tars = [os.path.abspath(t) for t in tars]
        self.root = Path(os.path.commonpath(self.tars)) if len(self.tars) > 1 else Path(self.tars[0])
        rows, names = [], []
        for t, tar in enumerate(self.tars):
            samples, _ = scan_tar(tar)
            for s in samples:
                lab = s.label or Component(-1, 0, "")
                rows.append((t, s.image.offset, s.image.size, lab.offset, lab.size))
                names.append(s.key.rsplit(":", 1)[1])
        if not rows:
            raise FileNotFoundError(f"the webdataset shards under {self.root} hold no image samples")
        self._rows = np.asarray(rows, dtype=np.int64)
        self._names = np.asarray(names)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> tuple:
        t, off, size, loff, lsize = (int(v) for v in self._rows[i])
        with open(self.tars[t], "rb") as fh:
            fh.seek(off)
            image = load_rgb(io.BytesIO(fh.read(size)))
            if loff < 0:
                return image, 0
            fh.seek(loff)
            return image, parse_label(fh.read(lsize))

    def describe(self, i: int) -> str:
        return f"{self.tars[int(self._rows[i, 0])]}:{self._names[i]}"
