"""Atomic, self-describing checkpoints that keep the last K and survive a kill at any moment.

A checkpoint is written to a temporary file in the same folder, flushed, fsync'ed and renamed over
its final name (rename is atomic on POSIX), then the folder is fsync'ed. ``latest.pt`` is a symlink
swapped atomically the same way. A process killed mid-write leaves at most a ``*.tmp`` file, which
loading ignores, so the previous checkpoint stays the latest loadable one.

Contents (``FORMAT``): ``encoder``, ``predictor``, ``target_encoder`` (plain state dicts, no
``module.`` prefix), ``opt``, ``step`` (optimizer steps done), ``epoch``, ``loss``, ``batch_size``,
``world_size``, ``lr`` (the authors' keys, so their tools read ours), plus ``schedules``,
``mask_sampler``, ``rng``, ``config`` and ``format``. Only tensors, numbers, strings, lists and dicts:
``torch.load(weights_only=True)`` reads it.

A write that fails (a full disk, a folder that cannot be written) raises an ``OSError`` naming the
checkpoint and removes its temporary file; ``check_writable`` finds an unwritable folder at start.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "ijepa_fast/1"
_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")
log = logging.getLogger(__name__)


class NotWritableError(OSError):
    """A folder or file of the run cannot be written; the message names it, the cause and what to do."""


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unmasked(err: BaseException) -> BaseException:
    """The exception behind ``err``: when a write fails (OSError) or a signal interrupts it
    (KeyboardInterrupt), torch.save's zip writer fails again while closing, and its RuntimeError
    hides the first exception as its context."""
    if isinstance(err, RuntimeError) and isinstance(err.__context__, (OSError, KeyboardInterrupt)):
        return err.__context__
    return err


def write_remedy(err: OSError) -> str:
    """What to do about a failed write, from its cause."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space on that disk"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make it writable"
    if err.errno in (errno.EEXIST, errno.ENOTDIR):
        return "move away the file that stands in its path"
    return "check that disk and folder"


def check_writable(folder: Path, what: str, setting: str) -> None:
    """Create ``folder`` and write and remove a small file in it, so that a folder that cannot be
    written fails at start rather than at the first checkpoint. The error names ``what`` the folder
    is and the ``setting`` that chooses another."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or str(err)
        raise NotWritableError(
            f"{what} {folder} cannot be written ({reason}): {write_remedy(err)}, or choose another {setting}"
        ) from None


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to ``path`` so that a reader sees the old file or the whole new one, never a part.

    A failed write raises an OSError naming ``path``; it, or a signal, leaves no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        cause = _unmasked(err)
        if isinstance(cause, OSError):  # named after the checkpoint, not its temporary file
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from err
        if cause is not err:
            raise cause from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _point_latest(ckpt_dir: Path, name: str) -> None:
    tmp = ckpt_dir / f".latest.{os.getpid()}.tmp"
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
    """Write ``state`` as the checkpoint of ``step``, point latest.pt at it, keep the newest ``keep``."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / checkpoint_name(step)
    atomic_torch_save({**state, "step": step, "format": FORMAT}, path)
    _point_latest(ckpt_dir, path.name)
    for _, old in list_checkpoints(ckpt_dir)[:-keep]:
        old.unlink()
    return path


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
