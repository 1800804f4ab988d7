"""The trainer's saves: in the step, or copied to host memory and written in the background.

``Saver.save`` joins the write in flight (so saves land in order and a failed one is reported before
the next starts), then either has the engine save in the step, or, with ``run.async_checkpoint`` and
an engine that has ``save_async``, takes the engine's host copy and hands the write to a
``BackgroundWriter``. ``join`` waits for the last write (the trainer calls it before it exits, after a
stop signal too). A failed write is one ``NotWritableError`` naming the file and what to do, whether
it failed in the step or in the background. ``check_space`` compares what the kept checkpoints need
with the run folder's free space before training starts.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ijepa_fast.io import checkpoint as ckpt
from ijepa_fast.io.async_save import BackgroundWriter, check_disk_space

log = logging.getLogger("ijepa_fast")


class Saver:
    """Checkpoints of one run folder through ``engine`` (see the module docstring)."""

    def __init__(self, engine, run_dir: Path, keep: int, background: bool):
        self.engine, self.run_dir, self.keep = engine, Path(run_dir), keep
        self.writer = BackgroundWriter() if background and hasattr(engine, "save_async") else None
        self._pending: tuple[int, Path] | None = None  # (step, path) of the write in flight

    @property
    def background(self) -> bool:
        return self.writer is not None

    def save(self, step: int, meta: dict) -> Path | None:
        """Checkpoint ``step``; returns the path ijepa-eval reads (rank 0; written by the time
        ``join`` returns, when in the background)."""
        self.join()
        try:
            if self.writer is None:
                return self.engine.save(self.run_dir, step, meta, self.keep)
            path, write = self.engine.save_async(self.run_dir, step, meta, self.keep)
        except OSError as err:
            raise self._failed(step, err) from err
        self._pending = (step, path)
        self.writer.submit(write)
        return path

    def join(self) -> None:
        """Wait for the write in flight; a failed write raises ``NotWritableError``."""
        if self.writer is None or self._pending is None:
            return
        step, path = self._pending
        self._pending = None
        try:
            self.writer.join()
        except OSError as err:
            raise self._failed(step, err) from err
        log.debug("checkpoint %s written in the background", path)

    def drain(self) -> None:
        """``join`` on a way out that may already carry an error: a failed write is logged, not raised."""
        try:
            self.join()
        except Exception as err:  # the exception already on its way out matters more
            log.error("%s", err)

    def _failed(self, step: int, err: OSError) -> ckpt.NotWritableError:
        latest = ckpt.list_checkpoints(self.run_dir / "checkpoints")
        kept = f"then --resume; the last checkpoint, {latest[-1][1]}, is unchanged" if latest else "then run again"
        return ckpt.NotWritableError(
            f"the checkpoint of step {step} could not be written to {err.filename or self.run_dir} "
            f"({err.strerror or err}): {ckpt.write_remedy(err)}, {kept}"
        )

    def check_space(self) -> None:
        """Before training (rank 0): refuse a run whose kept checkpoints cannot fit on the disk,
        warn when they nearly fill it. Engines that cannot estimate their size are not checked."""
        estimate = getattr(self.engine, "checkpoint_bytes", None)
        if estimate is None:
            return
        folder = self.run_dir / "checkpoints"
        existing = [path for _, path in ckpt.list_checkpoints(folder)]
        warning = check_disk_space(folder, estimate(), self.keep, existing)
        if warning:
            log.warning(warning)
