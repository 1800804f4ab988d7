"""Image folder (or file list with labels) -> webdataset tar shards with DALI index files: what
``ijepa-shard`` runs.

    summary = write_shards(list_folder(root), out, shard_size=1000, seed=0, workers=8)

Layout of ``out``: ``shard-000000.tar`` ... with one index file beside each (``shard-000000.idx``,
the format of ``data.wds``), ``classes.txt`` (class names in label order, for folder input) and
``.ijepa-shard.json`` (the settings and the shards done). A sample is ``<key>.<ext>`` (the image's
bytes as they are, its extension lower-cased), ``<key>.cls`` (the label, ASCII decimal) and
``<key>.path`` (the source path, relative to the source folder, UTF-8); the key is the sample's
position in the shuffled order, nine digits. Both loaders read ``out`` as it is (``data.root=out``).

- Shuffle: one permutation of all samples, seeded, dealt to shards in order; so a class-sorted
  folder gives shards that each hold a mix, and the same source and seed give the same bytes.
- Bad images (unreadable, or failing the check of ``check``, a full decode by default: DALI cannot
  skip a sample at run time) are left out, counted and named in the summary and the settings file.
  When every image is bad, the run's files are removed and ``ShardError`` names the count.
- ``out`` is a new or empty folder, or an earlier run's (its settings file): a folder holding other
  files is refused (``check_out``), so nothing of the user's is replaced.
- Resumable: each shard is written to a hidden temporary file and renamed when complete (index
  first, then the tar), and the settings file records each finished shard, so re-running the same
  command writes only the shards an interrupted run did not finish, and a half-written shard is never
  seen under a shard's name. Re-running with other settings into the same folder is refused.
- Parallel: shards are written by ``workers`` processes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ijepa_fast.data.dali.validate import check_image, describe
from ijepa_fast.data.folder import scan_folder
from ijepa_fast.data.wds import IMAGE_EXTS, index_text, scan_tar, write_text_atomically
from ijepa_fast.io.checkpoint import NotWritableError, write_remedy
from ijepa_fast.io.outputs import check_folder, write_files

log = logging.getLogger(__name__)

STATE = ".ijepa-shard.json"
CHECKS = ("full", "header")


class ShardError(ValueError):
    """Bad input or an output folder that holds something else; the message is one line."""


@dataclass
class Listing:
    """The samples to write: source paths (absolute), labels, and what to call them."""

    root: Path  # paths are stored relative to it
    paths: list[str]
    labels: list[int]
    classes: list[str] = field(default_factory=list)

    def digest(self) -> str:
        h = hashlib.sha1()
        for p, y in zip(self.paths, self.labels):
            h.update(f"{p}\t{y}\n".encode())
        return h.hexdigest()


@dataclass
class Summary:
    samples: int  # written into the shards
    shards: int
    reused: int  # shards an earlier run had finished
    bad: list[tuple[str, str]]  # (source path, reason) left out
    seconds: float
    out: Path

    def line(self) -> str:
        first = f" (first: {self.bad[0][0]}: {self.bad[0][1]})" if self.bad else ""
        return (
            f"ijepa-shard: {self.samples} images in {self.shards} shards in {self.out} "
            f"({self.reused} from an earlier run) in {self.seconds:.1f} s; "
            f"{len(self.bad)} bad image(s) left out{first}"
        )


def list_folder(root: str | Path) -> Listing:
    """The images of a folder with class sub-folders (or one unlabelled class): ``folder.scan_folder``."""
    root = Path(root).resolve()
    paths, labels, classes = scan_folder(root, as_str=True)
    return Listing(root, paths, labels, classes)


def read_file_list(path: str | Path, root: str | Path | None = None) -> Listing:
    """A text file of ``<image path> <integer label>`` lines (blank lines and ``#`` comments skipped);
    relative paths are taken from ``root`` (default: the list's folder). ``ShardError`` naming the
    line for a line without a label."""
    path = Path(path)
    base = Path(root).resolve() if root else path.resolve().parent
    paths, labels = [], []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            raise ShardError(f"{path}:{n}: expected '<image path> <label, an integer >= 0>', got {raw!r}")
        paths.append(str(base / parts[0]))
        labels.append(int(parts[1]))
    if not paths:
        raise ShardError(f"{path} lists no images")
    return Listing(base, paths, labels)


def shard_name(k: int) -> str:
    return f"shard-{k:06d}"


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: same input, same bytes
    tar.addfile(info, io.BytesIO(data))


def _sample(key: str, path: str, label: int, root: Path, check: str) -> tuple[list[tuple[str, bytes]], str]:
    """(members, "") of one sample, or ([], reason) when its image is bad."""
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in IMAGE_EXTS:
        return [], f"not an image file name (extensions: {', '.join(IMAGE_EXTS)})"
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return [], describe(err)
    reason = check_image(data, check)
    if reason:
        return [], reason
    rel = os.path.relpath(path, root)
    return [(f"{key}.{ext}", data), (f"{key}.cls", str(label).encode()), (f"{key}.path", rel.encode())], ""


def write_shard(out: Path, name: str, items: list[tuple[str, str, int]], root: Path, check: str) -> dict:
    """Write shard ``name`` of ``items`` [(key, path, label)] and its index; {"samples", "bad"}."""
    tmp_tar, tmp_idx = out / f".{name}.tar.{os.getpid()}.tmp", out / f".{name}.idx.{os.getpid()}.tmp"
    bad: list[list[str]] = []
    samples = 0
    try:
        with tarfile.open(tmp_tar, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, path, label in items:
                members, reason = _sample(key, path, label, root, check)
                if reason:
                    bad.append([path, reason])
                for member_name, data in members:
                    _member(tar, member_name, data)
                samples += bool(members)
        scanned, _ = scan_tar(tmp_tar)
        rows = [[(c.ext, c) for c in sorted((s.image, s.label, *s.others), key=lambda c: c.offset)] for s in scanned]
        write_text_atomically(tmp_idx, index_text(rows))
        os.replace(tmp_idx, out / f"{name}.idx")  # the index first: a tar under its name is complete
        os.replace(tmp_tar, out / f"{name}.tar")
    except OSError as err:  # a full disk: name the shard, not its temporary file
        raise NotWritableError(
            f"{out / name}.tar could not be written ({err.strerror or err}): {write_remedy(err)}"
        ) from None
    finally:
        tmp_tar.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
    return {"samples": samples, "bad": bad}


def _job(args: tuple) -> tuple[str, dict]:
    out, name, items, root, check = args
    return name, write_shard(out, name, items, root, check)


def _finished(pool: ProcessPoolExecutor, jobs: list):
    """The results of ``jobs`` in the order they finish."""
    for future in as_completed([pool.submit(_job, job) for job in jobs]):
        yield future.result()


def check_out(out: Path, source: Path | None = None) -> None:
    """Refuse, before any work, an ``out`` ijepa-shard must not write into: one that cannot be written,
    one inside the ``source`` folder (the shards would be written among the images), or a folder
    holding files that are not an earlier run's (no settings file): their names could be replaced."""
    check_folder(out, "OUT")
    if source is not None and source.is_dir() and out.resolve().is_relative_to(source.resolve()):
        raise ShardError(f"OUT {out} is inside the source folder {source}: write the shards outside it")
    if out.is_dir() and not (out / STATE).is_file() and any(out.iterdir()):
        raise ShardError(
            f"OUT {out} is not empty and is not an earlier ijepa-shard run's folder (it has no {STATE}): "
            "write into a new or empty folder"
        )


def _state(out: Path, settings: dict) -> dict:
    """The settings file's ``done`` table; ``out`` passed ``check_out``."""
    path = out / STATE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except ValueError:
        state = {}
    if state.get("settings") != settings:
        raise ShardError(
            f"{out} holds shards written from another source or with other settings: "
            "write into an empty folder (or delete this one)"
        )
    return state.get("done", {})


def _write_text(path: Path, text: str) -> None:
    write_files([(path, lambda tmp: tmp.write_text(text))])


def _remove_run(out: Path, done: dict, created: bool) -> None:
    """Delete what this run (and an earlier one of the same settings) wrote into ``out``."""
    for name in done:
        for ext in (".tar", ".idx"):
            (out / f"{name}{ext}").unlink(missing_ok=True)
    for name in (STATE, "classes.txt"):
        (out / name).unlink(missing_ok=True)
    if created and not any(out.iterdir()):
        out.rmdir()


def write_shards(
    listing: Listing,
    out: str | Path,
    *,
    shard_size: int = 1000,
    seed: int = 0,
    workers: int = 1,
    check: str = "full",
) -> Summary:
    """Write ``listing`` as shards into ``out`` (see the module docstring); resumes an interrupted run."""
    if shard_size < 1:
        raise ShardError(f"shard size {shard_size} must be >= 1")
    if check not in CHECKS:
        raise ShardError(f"check {check!r} is not one of {', '.join(CHECKS)}")
    started = time.perf_counter()
    out = Path(out)
    check_out(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    n = len(listing.paths)
    settings = {
        "version": 1,
        "source": str(listing.root),
        "images": n,
        "digest": listing.digest(),
        "seed": seed,
        "shard_size": shard_size,
        "check": check,
    }
    done = _state(out, settings)
    for stale in out.glob(".*.tmp"):  # a killed run's half-written shards
        stale.unlink()
    order = np.random.default_rng(seed).permutation(n)
    jobs = []
    for k in range(math.ceil(n / shard_size)):
        name = shard_name(k)
        if name in done and (out / f"{name}.tar").is_file() and (out / f"{name}.idx").is_file():
            continue
        positions = range(k * shard_size, min(n, (k + 1) * shard_size))
        items = [(f"{p:09d}", listing.paths[order[p]], listing.labels[order[p]]) for p in positions]
        jobs.append((out, name, items, listing.root, check))
    reused = math.ceil(n / shard_size) - len(jobs)
    save = lambda: _write_text(out / STATE, json.dumps({"settings": settings, "done": done}))  # noqa: E731
    save()  # before any other file: a folder this run wrote into is always known as a run to resume
    if listing.classes:
        _write_text(out / "classes.txt", "".join(f"{c}\n" for c in listing.classes))
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(jobs) > 1 else None
    try:  # each shard is recorded as it finishes, so an interruption loses only the ones in progress
        for name, result in map(_job, jobs) if pool is None else _finished(pool, jobs):
            done[name] = result
            save()
            for path, reason in result["bad"]:
                log.warning("left out a bad image: %s (%s)", path, reason)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    bad = [(p, r) for name in sorted(done) for p, r in done[name]["bad"]]
    samples = sum(r["samples"] for r in done.values())
    if not samples:  # nothing to train from: no shards, rather than empty ones that look like a dataset
        _remove_run(out, done, created)
        raise ShardError(f"all {len(bad)} images are bad, so no shard was written (first: {bad[0][0]}: {bad[0][1]})")
    return Summary(samples, len(done), reused, bad, time.perf_counter() - started, out)
