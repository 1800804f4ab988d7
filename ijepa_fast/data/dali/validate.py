"""The image check: find undecodable images before training, split over the ranks, with the verdicts
cached per dataset (``cache.py``).

Why a check, not DALI's own error handling: DALI cannot skip a sample that fails to decode. Its
operators work on whole batches in push mode, so a decoder error is a "critical error" that
invalidates the pipeline, and there is no way to ask the reader for a replacement sample (the DALI
maintainers' answer in NVIDIA/DALI#3913 and #1727). Its CPU JPEG decoder also accepts a truncated
file without an error (the missing rows come out grey), which PIL's full decode refuses.

Modes (``data.validate``):

- ``header`` (the default): PIL parses each file's header (and, for PNG, checks its chunks' CRCs),
  and a JPEG that does not end with the end-of-image marker (a truncated file) is decoded fully to
  decide. It reads a few kilobytes of most files, about a hundred times cheaper than a decode. What
  it lets through (image data damaged inside an intact file) the DALI loader catches at run time: it
  re-checks the files of the failed batches, excludes the culprits and rebuilds the pipeline.
- ``full``: decode everything with the CPU path's own decoder (``folder.load_rgb``).
- ``off``: trust the files (the run-time recovery still applies).

Each rank checks every world-th file (``validate_images(..., group=...)``) and the verdicts of the
bad files are gathered over a gloo process group, so every rank knows them all. Verdicts are kept
by path, size and mtime; a file checked in a mode at least as strict is not checked again.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from ijepa_fast.config.choices import IMAGE_CHECKS
from ijepa_fast.data.dali.cache import load_section, merge_section
from ijepa_fast.data.folder import load_rgb

log = logging.getLogger(__name__)

MODES = IMAGE_CHECKS
_STRENGTH = {"off": 0, "header": 1, "full": 2}
_BYTES_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>")  # PIL names the buffer
_FLUSH_S = 60.0  # seconds between cache writes: a killed ImageNet-scale check keeps its work
_CHUNK = 4096  # files handed to the threads at a time
_EOI = b"\xff\xd9"  # a JPEG's end-of-image marker: its last two bytes unless it is cut short


def check_image(source: str | Path | bytes, mode: str = "full") -> str:
    """'' when ``source`` (a path or encoded bytes) passes the check of ``mode``, else
    'ErrorType: message' (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"validation mode {mode!r} is not one of {MODES}")
    if mode == "off":
        return ""
    is_bytes = isinstance(source, bytes | bytearray | memoryview)
    fp = io.BytesIO(source) if is_bytes else source
    try:
        if mode == "header":
            with Image.open(fp) as img:
                fmt = img.format
                img.verify()
            if fmt != "JPEG" or _tail(source, is_bytes) == _EOI:
                return ""
            fp = io.BytesIO(source) if is_bytes else source  # no end marker: only a decode can tell
        load_rgb(fp)
    except Exception as err:  # any failure of a malformed file (struct.error, ...) is a verdict
        return describe(err)
    return ""


def _tail(source, is_bytes: bool) -> bytes:
    if is_bytes:
        return bytes(source[-2:])
    with open(source, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 2))
        return fh.read()


def describe(err: BaseException) -> str:
    """'ErrorType: message', without the buffer PIL names when decoding bytes."""
    return f"{type(err).__name__}: {_BYTES_REPR.sub('', str(err))}"


def covers(cached: str, wanted: str) -> bool:
    """Whether a verdict reached in mode ``cached`` answers a request in mode ``wanted``."""
    return _STRENGTH.get(cached, -1) >= _STRENGTH[wanted]


def _stat_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def rank_of(group) -> tuple[int, int]:
    """(rank, world size) in ``group`` (a torch process group), (0, 1) for None."""
    if group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def gather(obj, group) -> list:
    """``obj`` of every rank of ``group``, in rank order ([obj] for None)."""
    if group is None:
        return [obj]
    import torch.distributed as dist

    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def validate_images(
    paths: Iterable[str | Path],
    *,
    mode: str = "header",
    cache: str | Path | None = None,
    workers: int = 4,
    group=None,
    progress: bool = True,
) -> dict[str, str]:
    """{path: reason} of the files among ``paths`` that fail the check of ``mode``, on every rank.

    ``cache``: the dataset's verdict file (``cache.cache_file``), read and merged into; entries whose
    size and mtime still match and whose mode is at least as strict are not checked again.
    ``group``: a gloo process group; each rank then checks every world-th path and the bad verdicts
    are gathered. ``progress``: a progress bar on rank 0 while it checks.
    """
    if mode not in MODES:
        raise ValueError(f"validation mode {mode!r} is not one of {MODES}")
    paths = [os.path.abspath(p) for p in paths]
    if mode == "off":
        return {}
    rank, world = rank_of(group)
    started = time.perf_counter()
    files = load_section(cache, "files")
    bad: dict[str, str] = {}
    todo: list[tuple[str, tuple[int, int]]] = []
    mine = paths[rank::world]
    for p in mine:
        key = _stat_key(p)
        hit = files.get(p)
        if key is None:
            bad[p] = "FileNotFoundError: missing or unreadable"
        elif hit and (hit[0], hit[1]) == key and covers(hit[2], mode):
            if hit[3]:
                bad[p] = hit[3]
        else:
            todo.append((p, key))
    del files
    bad.update(_check(todo, mode, cache, workers, progress and rank == 0, rank, world))
    counts = [len(mine), len(mine) - len(todo), len(todo)]
    everyone = gather((bad, counts), group)
    merged = {p: r for part, _ in everyone for p, r in part.items()}
    if rank == 0:
        total, cached, checked = (sum(c[i] for _, c in everyone) for i in range(3))
        log.info(
            "image check (%s): %d files, %d verdicts from the cache, %d checked%s in %.1f s; %d undecodable%s",
            mode,
            total,
            cached,
            checked,
            f" by {world} ranks" if world > 1 else "",
            time.perf_counter() - started,
            len(merged),
            f"; cache {cache}" if cache else "; no cache",
        )
    return merged


def _check(todo: list, mode: str, cache, workers: int, show: bool, rank: int, world: int) -> dict[str, str]:
    """Check ``todo`` [(path, (size, mtime_ns))] in threads (PIL releases the GIL while decoding),
    merging the verdicts into the cache every ``_FLUSH_S`` seconds and at the end; {path: reason}."""
    if not todo:
        return {}
    from ijepa_fast.runtime.progress import ProgressBar

    bad: dict[str, str] = {}
    pending: dict[str, list] = {}
    flushed = time.monotonic()
    desc = f"image check ({mode})" + (f", rank 0 of {world}" if world > 1 else "")
    with (
        ThreadPoolExecutor(max(1, workers)) as pool,
        ProgressBar(total=len(todo), desc=desc, unit="img", disable=not show or None, dynamic_ncols=True) as bar,
    ):
        for start in range(0, len(todo), _CHUNK):  # (map submits its whole input at once)
            chunk = todo[start : start + _CHUNK]
            for (p, key), reason in zip(chunk, pool.map(lambda item: check_image(item[0], mode), chunk)):
                pending[p] = [key[0], key[1], mode, reason]
                if reason:
                    bad[p] = reason
                bar.update()
            if time.monotonic() - flushed > _FLUSH_S:
                merge_section(cache, "files", pending)
                pending, flushed = {}, time.monotonic()
    merge_section(cache, "files", pending)
    return bad
