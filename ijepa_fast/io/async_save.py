"""Checkpoints written in the background, and the disk-space check before a run starts.

A save has two halves. ``host_copy`` takes the state into host memory (the training step waits for
this copy only: device-to-host into pinned buffers, or a clone on the CPU, since the next step
changes the live tensors in place). The write (``checkpoint.save_checkpoint``: temporary file,
fsync, atomic rename, ``latest.pt``, retention) then runs on ``BackgroundWriter``'s thread while
training goes on. Nothing about the files changes: a kill -9 mid-write leaves a ``*.tmp`` that no
loader reads and the next start deletes, and the previous checkpoint stays the newest that loads.

One write at a time: ``submit`` first joins the write before it (so saves land in step order and
retention sees them in turn), and the trainer joins the last one before it exits, also after a
stop signal. A write that failed raises at that join, in the training thread, with its own error.
The price is host memory: one checkpoint's copy stays in RAM, reused as the buffers of the next
copy (``host_copy(into=...)``: fresh memory is slow to fault in, as the stall benchmark showed).

The engine decides how its state splits into the two halves (``Engine.save_async`` returns the
write after taking the copy); engines without it save in the step (``Engine.save``).

DeepSpeed 0.19.8's own decoupled engine (``checkpoint_engine`` config: ``DecoupledCheckpointEngine``
over ``FastCheckpointEngine``) is not used: it writes each file in place under its final name (no
temporary file and rename, so a kill mid-write leaves a half file where a loader looks), hands the
live tensors to a spawned writer process, commits only at the next save, loads with its own
``torch.load``, and ``FastCheckpointEngine`` needs DeepSpeed's compiled ``async_io`` op.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Free space below this multiple of what the kept checkpoints need gets a warning at start.
TIGHT_MARGIN = 1.25


def host_copy(tree: Any, into: Any = None) -> Any:
    """``tree`` (dicts, lists, tuples of tensors and plain values) with every tensor copied to host
    memory, sharing nothing with the original: device tensors go to pinned buffers (asynchronous
    copies, one synchronisation at the end), CPU tensors to fresh ones.

    ``into``: an earlier copy whose write has ended; a tensor of the same shape and dtype at the same
    place is reused as the buffer (fresh host memory is slow to fault in, and a run saves the same
    shapes every time). The caller makes sure no write still reads it."""
    cuda = []

    def copy(x: Any, old: Any) -> Any:
        if isinstance(x, torch.Tensor):
            x = x.detach()
            if _reusable(old, x):
                out = old
            elif x.device.type == "cuda":
                out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            else:
                out = torch.empty(x.shape, dtype=x.dtype)
            out.copy_(x, non_blocking=x.device.type == "cuda")
            if x.device.type == "cuda":
                cuda.append(out)
            return out
        if isinstance(x, dict):
            old = old if isinstance(old, dict) else {}
            return type(x)((k, copy(v, old.get(k))) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            old = old if isinstance(old, (list, tuple)) and len(old) == len(x) else [None] * len(x)
            return type(x)(copy(v, o) for v, o in zip(x, old))
        return x

    out = copy(tree, into)
    if cuda:
        torch.cuda.synchronize()
    return out


def _reusable(old: Any, x: torch.Tensor) -> bool:
    """``old`` can take a copy of ``x``: a host tensor of its shape and dtype (pinned for a device one)."""
    if not isinstance(old, torch.Tensor) or old.device.type != "cpu":
        return False
    return old.shape == x.shape and old.dtype == x.dtype and (x.device.type != "cuda" or old.is_pinned())


class BackgroundWriter:
    """Runs one write at a time on its own thread (not a daemon: the interpreter waits for it)."""

    def __init__(self, name: str = "checkpoint-writer"):
        self.name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._result: Any = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, write: Callable[[], Any]) -> None:
        """Join the previous write (raising its error), then start ``write()`` in the background."""
        self.join()

        def run() -> None:
            try:
                self._result = write()
            except BaseException as err:  # re-raised in the training thread by join()
                self._error = err

        self._thread = threading.Thread(target=run, name=self.name, daemon=False)
        self._thread.start()

    def join(self) -> Any:
        """Wait for the write in flight; return its result, or raise its error (once)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        result, self._result = self._result, None
        return result


# ----------------------------------------------------------------------------- disk space


class InsufficientSpaceError(OSError):
    """The run folder's disk cannot hold the checkpoints the run keeps."""


def tensor_bytes(tree: Any) -> int:
    """Bytes of every tensor in ``tree`` (dicts, lists, tuples)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _bytes_on_disk(path: Path) -> int:
    """Bytes of the file ``path``, or of every file under the folder ``path``; links count nothing."""
    if path.is_symlink():
        return 0
    if path.is_dir():
        return sum(_bytes_on_disk(child) for child in path.iterdir())
    return path.stat().st_size if path.is_file() else 0


def check_disk_space(folder: Path, checkpoint_bytes: int, keep: int, existing: Iterable[Path] = ()) -> str | None:
    """Raise ``InsufficientSpaceError`` (one line) when ``checkpoint_bytes x (keep + 1)`` (the kept
    checkpoints and the one being written) exceeds the free space of ``folder``'s disk plus the
    ``existing`` checkpoint files there (retention deletes them as new ones land). Return a warning
    line when the margin is under ``TIGHT_MARGIN``, else None. An ``existing`` folder counts with
    every file in it (a sharded engine's checkpoint folder)."""
    folder = Path(folder)
    probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    reclaimable = sum(_bytes_on_disk(Path(p)) for p in existing)
    need, room = checkpoint_bytes * (keep + 1), free + reclaimable
    what = f"{keep + 1} checkpoints of about {_gb(checkpoint_bytes)} ({keep} kept + 1 being written)"
    if need > room:
        raise InsufficientSpaceError(
            f"{folder}: {what} need {_gb(need)}, but its disk has {_gb(free)} free"
            + (f" (+ {_gb(reclaimable)} of checkpoints retention would delete)" if reclaimable else "")
            + ": free space, lower run.keep_checkpoints, or choose another run.out_dir"
        )
    if need * TIGHT_MARGIN > room:
        return f"{folder}: {what} need {_gb(need)} of the {_gb(room)} available: the disk will be nearly full"
    return None
