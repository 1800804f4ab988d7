"""Webdataset tar shards for DALI's reader: scan, check, and write DALI index files.

The layout and the index format are ``ijepa_fast.data.wds``'s. We write the index files ourselves,
which buys three things: no index inference at every start-up (DALI warns it "may take some time"),
bad samples left out of the index (DALI cannot skip them at decode time, see ``validate.py``), and
``data.limit``. The image component is written with extension ``img`` and the label with ``cls``, so
the reader's outputs do not depend on how the shards spell their extensions. The image check is
split over the ranks by tar (each rank checks every world-th tar not in the cache; the verdicts are
gathered), and its verdicts are cached per tar by path, size and mtime.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ijepa_fast.data.dali.cache import load_section, merge_section
from ijepa_fast.data.dali.validate import MODES, check_image, covers, gather, rank_of
from ijepa_fast.data.wds import WdsSample, index_text, read_member, scan_tar, write_text_atomically

log = logging.getLogger(__name__)


def write_index(path: str | Path, samples: list[WdsSample]) -> None:
    """DALI's index of ``samples`` (components ``img`` and ``cls``), written atomically."""
    rows = [[("img", s.image)] + ([("cls", s.label)] if s.label is not None else []) for s in samples]
    write_text_atomically(path, index_text(rows))


def _check_tars(scanned: list, mode: str, table: dict, workers: int, group) -> dict:
    """{tar: cache entry} for the tars of ``scanned`` [(tar, stat, samples)] that the cache does not
    answer, checked by this rank (every world-th) and gathered from the others."""
    rank, world = rank_of(group)
    todo = [
        (tar, st, samples)
        for tar, st, samples in scanned
        if not (
            (hit := table.get(tar))
            and (hit["size"], hit["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
            and covers(hit["mode"], mode)
        )
    ]
    mine = {}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for tar, st, samples in todo[rank::world]:
            reasons = list(pool.map(lambda s, t=tar: check_image(read_member(t, s.image), mode), samples))
            bad = {s.key: r for s, r in zip(samples, reasons) if r}
            mine[tar] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "mode": mode, "bad": bad}
    return {tar: entry for part in gather(mine, group) for tar, entry in part.items()}


def prepare_webdataset(
    tars: list[str | Path],
    index_dir: str | Path,
    *,
    mode: str = "header",
    cache: str | Path | None = None,
    workers: int = 4,
    limit: int = 0,
    multiple_of: int = 1,
    group=None,
) -> tuple[list[str], list[str], int, dict[str, str]]:
    """Scan and check ``tars`` and write one DALI index per tar (without bad samples) into
    ``index_dir``. Returns (tar paths, index paths, number of samples, {sample key: reason}).

    ``cache``: the dataset's verdict file (per-tar verdicts keyed by path, size and mtime: only
    changed tars are read again). ``limit``: keep only the first ``limit`` good samples, in tar order
    (0: all). ``multiple_of``: then leave out the last samples so that the count is a multiple of it
    (the number of ranks: equal shards, see ``loader.py``). ``group``: a gloo process group that
    splits the check (see ``_check_tars``).
    """
    if mode not in MODES:
        raise ValueError(f"validation mode {mode!r} is not one of {MODES}")
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    scanned = []
    for tar in (os.path.abspath(t) for t in tars):
        samples, left_out = scan_tar(tar)
        if left_out:
            log.warning(
                "%s: %d sample(s) without an image member or with whitespace in a name are left out", tar, left_out
            )
        scanned.append((tar, os.stat(tar), samples))
    table = load_section(cache, "tars")
    fresh = _check_tars(scanned, mode, table, workers, group) if mode != "off" else {}
    if rank_of(group)[0] == 0:
        merge_section(cache, "tars", fresh)
    table.update(fresh)
    bad_all: dict[str, str] = {}
    found = []
    for tar, st, samples in scanned:
        bad = table[tar]["bad"] if mode != "off" else {}
        bad_all.update(bad)
        found.append((tar, st, [s for s in samples if s.key not in bad]))
    log.info(
        "image check (%s): %d tars, %d from the cache, %d checked; %d undecodable samples",
        mode,
        len(scanned),
        len(scanned) - len(fresh) if mode != "off" else 0,
        len(fresh),
        len(bad_all),
    )
    return (*_write_indexes(found, index_dir, mode, limit, multiple_of), bad_all)


def _write_indexes(found: list, index_dir: Path, mode: str, limit: int, multiple_of: int) -> tuple:
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
    return kept_tars, index_paths, used
