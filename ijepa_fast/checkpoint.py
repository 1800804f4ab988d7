"""Atomic, self-describing checkpoints that keep the last K and survive a kill at any moment.

A checkpoint is written to a temporary file in the same folder, flushed, fsync'ed and renamed over
its final name (rename is atomic on POSIX), then the folder is fsync'ed. ``latest.pt`` is a symlink
swapped atomically the same way. A process killed mid-write leaves at most a ``*.tmp`` file, which
loading ignores, so the previous checkpoint stays the latest loadable one; ``remove_partial_files``
deletes such files at the next start. Retention keeps the newest K checkpoints that load: a damaged
file never counts as one of them.

Contents (``FORMAT``): ``encoder``, ``predictor``, ``target_encoder`` (plain state dicts, no
``module.`` prefix), ``opt``, ``step`` (optimizer steps done), ``epoch``, ``loss``, ``batch_size``,
``world_size``, ``lr`` (the authors' keys, so their tools read ours), plus ``schedules``,
``mask_sampler``, ``rng``, ``config`` and ``format``. Only tensors, numbers, strings, lists and dicts:
``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "ijepa_fast/1"
_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")
_TEMP = re.compile(r"^\..+\.\d+\.tmp$")  # temp_path's names: .<final name>.<pid>.tmp
log = logging.getLogger(__name__)


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """Where ``path`` is written before its atomic rename (hidden, per process, removable after a crash)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_partial_files(folder: Path) -> list[Path]:
    """Delete the temporary files that writers killed mid-write left in ``folder``; return them.

    Only while no other process writes there (the trainer holds the run folder's lock).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    partial = [p for p in folder.iterdir() if _TEMP.match(p.name) and (p.is_symlink() or p.is_file())]
    for path in partial:
        path.unlink()
    return partial


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to ``path`` so that a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _point_latest(ckpt_dir: Path, name: str) -> None:
    tmp = temp_path(ckpt_dir / "latest.pt")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, ckpt_dir / "latest.pt")


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints, oldest first (temporary files are not listed)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(ckpt_dir: Path, state: dict[str, Any], step: int, keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``step``, point latest.pt at it, keep the newest ``keep``
    that load."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / checkpoint_name(step)
    atomic_torch_save({**state, "step": step, "format": FORMAT}, path)
    _point_latest(ckpt_dir, path.name)
    _retain(ckpt_dir, keep, written=path)
    return path


def _retain(ckpt_dir: Path, keep: int, written: Path) -> None:
    """Delete every checkpoint older than the newest ``keep`` that load. One that does not load is
    not counted, so it never displaces a loadable one; it stays until ``keep`` newer ones load."""
    loadable = 0
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        if loadable >= keep:
            path.unlink()
        elif path == written or loads(path):
            loadable += 1
        else:
            log.warning("checkpoint %s does not load: kept, but not counted in run.keep_checkpoints", path)


def loads(path: Path) -> bool:
    """True when ``path`` loads as a checkpoint (memory-mapped: the tensors' bytes are not read)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # any damage (truncated, not a zip, not a checkpoint) means "does not load"
        return False
    return True


def newest_loadable(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint in ``ckpt_dir`` that loads, or None."""
    return next((path for _, path in reversed(list_checkpoints(ckpt_dir)) if loads(path)), None)


def load_latest(ckpt_dir: Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The newest checkpoint that loads; a damaged one is reported and the one before it tried."""
    for step, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # a damaged file must not hide the good one before it
            log.warning("checkpoint %s (step %d) does not load (%s); trying the previous one", path, step, err)
    return None


def rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), numpy and random, as tensors/lists for weights_only loads."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": _python_rng_to_list(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_rng_to_list(st: tuple) -> list:
    version, internal, gauss = st
    return [version, list(internal), gauss]
