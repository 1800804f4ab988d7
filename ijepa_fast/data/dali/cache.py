"""The verdict cache of the image check: one JSON file per dataset, shared by every run on that data.

Where: ``<cache folder>/image-check/<dataset folder name>-<hash of its real path>.json``. The cache
folder is ``data.check_cache`` when set, else ``$IJEPA_CACHE_DIR``, else ``$XDG_CACHE_HOME/ijepa_fast``,
else ``~/.cache/ijepa_fast``; ``data.check_cache: off`` keeps no cache. Keying the file by the
dataset's real path (not the run folder) is what lets a new run, a resumed run and every rank of a
node reuse the verdicts; entries are keyed by file path, size and mtime, so a changed file is checked
again.

Tables (sections): ``files`` {path: [size, mtime_ns, mode, reason]} (image folders), ``tars``
{tar path: {size, mtime_ns, mode, bad}} (webdataset shards). Writers merge: each takes an exclusive
``flock`` on ``<file>.lock``, reads the file, adds its entries, writes a temporary file and renames
it over the cache. Readers never lock: the rename is atomic, so they see the old or the new file,
never a torn one; the lock only keeps two writers (ranks, or concurrent runs) from dropping each
other's entries. A cache that cannot be written (read-only home) costs a warning, not the run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

VERSION = 2  # 2: per-dataset files shared by runs and ranks; header checks also test JPEG ends
ENV = "IJEPA_CACHE_DIR"


def cache_home(environ: Mapping[str, str] | None = None) -> Path:
    """``$IJEPA_CACHE_DIR``, else ``$XDG_CACHE_HOME/ijepa_fast``, else ``~/.cache/ijepa_fast``."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV):
        return Path(environ[ENV]).expanduser()
    xdg = environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ijepa_fast"


def cache_file(root: str | os.PathLike, setting: str = "", environ: Mapping[str, str] | None = None) -> Path | None:
    """The cache file of the dataset at ``root`` for a ``data.check_cache`` value ("": the user cache
    folder, "off": None, else a folder)."""
    if setting == "off":
        return None
    folder = Path(setting).expanduser() if setting else cache_home(environ)
    real = os.path.realpath(root)
    digest = hashlib.sha1(real.encode()).hexdigest()[:16]
    return folder / "image-check" / f"{Path(real).name or 'root'}-{digest}.json"


def _read(cache: Path) -> dict:
    data = json.loads(cache.read_text())
    return data if isinstance(data, dict) and data.get("version") == VERSION else {"version": VERSION}


def load_section(cache: str | Path | None, section: str) -> dict:
    """One table of the cache ({} when there is none, it is unreadable or of another version)."""
    if cache is None or not Path(cache).is_file():
        return {}
    try:
        return dict(_read(Path(cache)).get(section, {}))
    except (OSError, ValueError) as err:
        log.warning("ignoring the unreadable image-check cache %s (%s)", cache, err)
        return {}


def merge_section(cache: str | Path | None, section: str, updates: Mapping) -> bool:
    """Add ``updates`` to one table (they win over what is there) under the writers' lock, with an
    atomic rename; False (and a warning) when the cache cannot be written."""
    if cache is None or not updates:
        return cache is not None
    cache = Path(cache)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(cache.with_name(cache.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            try:
                data = _read(cache) if cache.is_file() else {"version": VERSION}
            except (OSError, ValueError):
                data = {"version": VERSION}  # a torn file from an older writer: start again
            data.setdefault(section, {}).update(updates)
            tmp = cache.with_name(f".{cache.name}.{uuid.uuid4().hex}.tmp")
            try:
                tmp.write_text(json.dumps(data, separators=(",", ":")))
                os.replace(tmp, cache)
            finally:
                tmp.unlink(missing_ok=True)
    except OSError as err:
        log.warning("could not write the image-check cache %s (%s): the next run checks again", cache, err)
        return False
    return True
