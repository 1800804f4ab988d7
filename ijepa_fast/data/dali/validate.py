"""The validation pass: find undecodable images once, before training, and cache the verdicts.

Why a pass, not DALI's own error handling: DALI cannot skip a sample that fails to decode. Its
operators work on whole batches in push mode, so a decoder error is a "critical error" that
invalidates the pipeline, and there is no way to ask the reader for a replacement sample (the DALI
maintainers' answer in NVIDIA/DALI#3913 and #1727). Its CPU JPEG decoder also accepts a truncated
file without an error (the missing rows come out grey), which PIL's full decode refuses.

So every file is decoded once with the CPU path's own decoder (``folder.load_rgb``: full decode,
truncation is an error), in threads (PIL releases the GIL while decoding), and the verdicts are
kept in a JSON file keyed by path, size and mtime: a resumed or repeated run re-checks only files
that changed. The loaders then replace each bad file by the next good one and count it, as the
CPU path does. Modes: ``full`` (decode everything), ``header`` (PIL's ``verify``: structure only,
misses truncated JPEG data), ``off`` (trust the files; the DALI loader still recovers from a
decoder error by re-checking the files of the failed batches, see ``loader.py``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from ijepa_fast.data.folder import load_rgb

log = logging.getLogger(__name__)

MODES = ("full", "header", "off")
_STRENGTH = {"off": 0, "header": 1, "full": 2}
CACHE_VERSION = 1
_BYTES_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>")  # PIL names the buffer
_FLUSH_EVERY = 20_000  # verdicts between cache writes: a killed ImageNet-scale pass keeps its work


def check_image(source: str | Path | bytes, mode: str = "full") -> str:
    """'' when ``source`` (a path or encoded bytes) decodes, else 'ErrorType: message'."""
    if mode not in MODES:
        raise ValueError(f"validation mode {mode!r} is not one of {MODES}")
    if mode == "off":
        return ""
    fp = io.BytesIO(source) if isinstance(source, bytes | bytearray | memoryview) else source
    try:
        if mode == "full":
            load_rgb(fp)
        else:
            with Image.open(fp) as img:
                img.verify()
    except Exception as err:  # any failure of a malformed file (struct.error, ...) is a verdict
        return describe(err)
    return ""


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


def load_section(cache: str | Path | None, section: str) -> dict:
    """One table of the cache file ({} when absent, unreadable or of another version). Sections:
    ``files`` {path: [size, mtime_ns, mode, reason]}, ``tars`` (see ``webdataset.py``)."""
    if cache is None or not Path(cache).is_file():
        return {}
    try:
        data = json.loads(Path(cache).read_text())
    except (OSError, ValueError) as err:
        log.warning("ignoring the unreadable validation cache %s (%s)", cache, err)
        return {}
    return data.get(section, {}) if data.get("version") == CACHE_VERSION else {}


def save_section(cache: str | Path, section: str, table: dict) -> None:
    """Replace one table, keeping the others; atomic (tmp + rename), so a crash or a second rank
    writing the same verdicts never leaves a torn file."""
    cache = Path(cache)
    data = {"version": CACHE_VERSION}
    if cache.is_file():
        try:
            old = json.loads(cache.read_text())
            if old.get("version") == CACHE_VERSION:
                data = old
        except (OSError, ValueError):
            pass
    data[section] = table
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, cache)


def validate_images(
    paths: Iterable[str | Path], *, mode: str = "full", cache: str | Path | None = None, workers: int = 4
) -> dict[str, str]:
    """{path: reason} of the undecodable files among ``paths`` (see the module docstring).

    ``cache``: a JSON file read and updated in place; entries whose size and mtime still match and
    whose mode is at least as strict as ``mode`` are not checked again.
    """
    if mode not in MODES:
        raise ValueError(f"validation mode {mode!r} is not one of {MODES}")
    paths = [os.path.abspath(p) for p in paths]
    if mode == "off":
        return {}
    files = load_section(cache, "files")
    bad: dict[str, str] = {}
    todo: list[tuple[str, tuple[int, int] | None]] = []
    for p in paths:
        key = _stat_key(p)
        hit = files.get(p)
        if key is None:
            bad[p] = "FileNotFoundError: missing or unreadable"
        elif hit and (hit[0], hit[1]) == key and covers(hit[2], mode):
            if hit[3]:
                bad[p] = hit[3]
        else:
            todo.append((p, key))
    if todo:
        started = time.perf_counter()
        log.info(
            "validating %d of %d images (%s decode, %d threads)%s",
            len(todo),
            len(paths),
            mode,
            workers,
            f"; cache {cache}" if cache else "",
        )
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for start in range(0, len(todo), _FLUSH_EVERY):
                chunk = todo[start : start + _FLUSH_EVERY]
                for (p, key), reason in zip(chunk, pool.map(lambda item: check_image(item[0], mode), chunk)):
                    files[p] = [key[0], key[1], mode, reason]
                    if reason:
                        bad[p] = reason
                if cache is not None:
                    save_section(cache, "files", files)
        log.info(
            "validated %d images in %.1f s: %d undecodable",
            len(todo),
            time.perf_counter() - started,
            sum(1 for p, _ in todo if p in bad),
        )
    return bad
