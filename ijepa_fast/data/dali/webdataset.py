"""Webdataset tar shards for DALI's reader: scan, validate, and write DALI index files.

A webdataset sample is the run of consecutive tar members sharing a basename (the name up to the
first dot after the last '/'); its image is the first member with an image extension, its label an
optional ``.cls`` member holding a decimal integer. We write DALI's index files (format v1.2:
``<ext> <data offset> <size> <member name>`` per component) ourselves, which buys three things: no
index inference at every start-up (DALI warns it "may take some time"), bad samples left out of the
index (DALI cannot skip them at decode time, see ``validate.py``), and ``data.limit``. The image
component is written with extension ``img`` and the label with ``cls``, so the reader's outputs do
not depend on how the shards spell their extensions.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ijepa_fast.data.dali.validate import MODES, check_image, covers, load_section, save_section
from ijepa_fast.data.errors import DataSourceError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class Component:
    offset: int  # of the member's data in the tar, a multiple of 512
    size: int
    name: str  # the member's name


@dataclass(frozen=True)
class WdsSample:
    key: str  # "<tar path>:<basename>", how bad samples are reported
    image: Component
    label: Component | None


def split_name(name: str) -> tuple[str, str]:
    """(basename, extension) as DALI's webdataset reader splits a member name."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def scan_tar(path: str | Path) -> tuple[list[WdsSample], int]:
    """The samples of one tar that hold an image, in archive order, and how many were left out
    (no image member, or a name DALI's index format cannot hold). ``DataSourceError`` naming the
    shard when it is truncated or damaged."""
    samples: list[WdsSample] = []
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
        samples.append(WdsSample(f"{path}:{base}", comp(image), comp(label) if label else None))
    return samples, left_out


def _read(path: str | Path, comp: Component) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(comp.offset)
        return fh.read(comp.size)


def write_index(path: str | Path, samples: list[WdsSample]) -> None:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for s in samples:
        parts = [f"img {s.image.offset} {s.image.size} {s.image.name}"]
        if s.label is not None:
            parts.append(f"cls {s.label.offset} {s.label.size} {s.label.name}")
        lines.append(" ".join(parts))
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def prepare_webdataset(
    tars: list[str | Path],
    index_dir: str | Path,
    *,
    mode: str = "full",
    cache: str | Path | None = None,
    workers: int = 4,
    limit: int = 0,
    multiple_of: int = 1,
) -> tuple[list[str], list[str], int, dict[str, str]]:
    """Scan and validate ``tars`` and write one DALI index per tar (without bad samples) into
    ``index_dir``. Returns (tar paths, index paths, number of samples, {sample key: reason}).

    ``cache``: JSON of per-tar verdicts keyed by path, size and mtime (only changed tars are read
    again). ``limit``: keep only the first ``limit`` good samples, in tar order (0: all).
    ``multiple_of``: then leave out the last samples so that the count is a multiple of it (the
    number of ranks: equal shards, see ``loader.py``).
    """
    if mode not in MODES:
        raise ValueError(f"validation mode {mode!r} is not one of {MODES}")
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    table = load_section(cache, "tars")
    found: list[tuple[str, os.stat_result, list[WdsSample]]] = []
    bad_all: dict[str, str] = {}
    for tar in (os.path.abspath(t) for t in tars):
        st = os.stat(tar)
        samples, left_out = scan_tar(tar)
        hit = table.get(tar)
        if hit and (hit["size"], hit["mtime_ns"]) == (st.st_size, st.st_mtime_ns) and covers(hit["mode"], mode):
            bad = hit["bad"]
        else:
            with ThreadPoolExecutor(max(1, workers)) as pool:
                reasons = list(pool.map(lambda s, t=tar: check_image(_read(t, s.image), mode), samples))
            bad = {s.key: r for s, r in zip(samples, reasons) if r}
            table[tar] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "mode": mode, "bad": bad}
            if left_out:
                log.warning(
                    "%s: %d sample(s) without an image member or with whitespace in a name are left out", tar, left_out
                )
        bad_all.update(bad)
        found.append((tar, st, [s for s in samples if s.key not in bad]))
    if cache is not None:
        save_section(cache, "tars", table)
    total = sum(len(good) for _, _, good in found)
    keep = min(total, limit) if limit else total
    keep -= keep % max(1, multiple_of)
    if keep < total and not limit:
        log.info(
            "leaving out the last %d of %d samples: %d ranks need shards of equal size",
            total - keep,
            total,
            multiple_of,
        )
    kept_tars, index_paths, used = [], [], 0
    for tar, st, good in found:
        good = good[: keep - used]
        if not good:
            continue
        digest = hashlib.sha1(f"{tar}:{st.st_size}:{st.st_mtime_ns}:{mode}:{len(good)}".encode()).hexdigest()[:12]
        index = index_dir / f"{Path(tar).stem}-{digest}.idx"
        write_index(index, good)
        kept_tars.append(tar)
        index_paths.append(str(index))
        used += len(good)
    return kept_tars, index_paths, used, bad_all
