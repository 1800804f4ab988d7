"""When and how the trainer saves: the engine's checkpoint after a finite-weights check, in the step
or copied to host memory and written in the background; one error naming the file for a failed
write; the save of the weights from before a non-finite step; the disk-space check before step 0.

``Checkpointer.save`` joins the write in flight (so saves land in order and a failed one is reported
before the next starts), then either has the engine save in the step, or, with ``run.async_checkpoint``
and an engine that has ``save_async``, takes the engine's host copy and hands the write to a
``BackgroundWriter``. An engine that writes in the background itself (FSDP2's asynchronous DCP
saves) is waited for through its ``finish_saves``: at once when ``run.async_checkpoint`` is off,
else by ``join``. ``join`` waits for the last write (the trainer calls it before it exits, after a
stop signal too). ``check_space`` compares what the kept checkpoints need with the run folder's free
space before training starts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from ijepa_fast.io import checkpoint as ckpt
from ijepa_fast.io.async_save import BackgroundWriter, check_disk_space
from ijepa_fast.train.step import Engine

log = logging.getLogger("ijepa_fast")


class NonFiniteLossError(RuntimeError):
    """The training loss, or the weights about to be saved, became NaN or infinite."""


class Checkpointer:
    """Saves ``engine`` into ``run_dir`` (``meta(step, loss)``: what a checkpoint holds besides the
    engine's state); ``saved_step`` is the step of this process's last save (None: none yet);
    ``background``: writes run in a background thread on a host copy (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        run_dir: Path,
        keep: int,
        meta: Callable[[int, float], dict],
        start_step: int,
        background: bool = False,
    ):
        self.engine, self.run_dir, self.keep, self.meta = engine, Path(run_dir), keep, meta
        self.start_step = start_step
        self.saved_step: int | None = None
        self.in_background = background  # run.async_checkpoint
        host_copies = getattr(engine, "save_async", None) is not None
        self.writer = BackgroundWriter() if background and host_copies else None
        self._pending: tuple[int, Path] | None = None  # (step, path) of the write in flight

    @property
    def background(self) -> bool:
        return self.writer is not None

    def save(self, step: int, loss: float) -> Path | None:
        """The engine's checkpoint (collective under DeepSpeed); its path on rank 0 (written by the
        time ``join`` returns, when in the background). A failed write (a full disk...) is one error
        that names the file and what to do."""
        self.check_weights(step)
        self.join()
        meta = self.meta(step, loss)
        try:
            if self.writer is None:
                path = self.engine.save(self.run_dir, step, meta, self.keep)
                if not self.in_background:
                    self.engine.finish_saves()  # an engine that writes in the background itself
            else:
                path, write = self.engine.save_async(self.run_dir, step, meta, self.keep)
                self._pending = (step, path)
                self.writer.submit(write)
        except OSError as err:
            raise self._failed(step, err) from err
        self.saved_step = step
        if path is not None:
            log.info("checkpoint %s", path)
        return path

    def join(self) -> None:
        """Wait for the write in flight, ours or the engine's own (``finish_saves``: FSDP2 writes DCP
        folders in the background itself); a failed write raises ``NotWritableError``."""
        self.engine.finish_saves()
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

    def save_before_non_finite(self, good_steps: int, loss: float) -> None:
        """Save the weights of ``good_steps`` steps: the step skipped the first non-finite step and
        every one after it, so the weights are those unless the engine cannot skip (it applied them:
        its weights are then not saved). Nothing new since the start or the last save: no save."""
        if not self.engine.skips_non_finite or good_steps in (self.start_step, self.saved_step):
            return
        with contextlib.suppress(NonFiniteLossError):  # weights gone bad another way: keep the last save
            self.save(good_steps, loss)

    def check_weights(self, step: int) -> None:
        """Stop before saving non-finite weights (one reduction on the device; a save reads the weights
        to the host anyway, so reading its result adds no sync). Collective under DeepSpeed."""
        if not bool(self.engine.weights_finite()):
            raise NonFiniteLossError(
                f"the weights became non-finite by step {step}; stopping without saving them ({self.last_good()})"
            )

    def last_good(self) -> str:
        self.drain()
        good = ckpt.newest_loadable(self.run_dir / "checkpoints")
        return f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"

    def check_space(self) -> None:
        """Before training (rank 0): refuse a run whose kept checkpoints cannot fit on the disk,
        warn when they nearly fill it."""
        folder = self.run_dir / "checkpoints"
        existing = [path for _, path in ckpt.list_checkpoints(folder)]
        # on a resume, the kept checkpoints already hold part of the room keep + 1 of them need:
        # a sharded engine keeps the rest of each in its own folder (DeepSpeed tags, DCP steps)
        folders = [path for path, _ in self.engine.checkpoint_folders(self.run_dir, True)]
        existing += [path for path in folders if path != folder and path.is_dir()]
        warning = check_disk_space(folder, self.engine.checkpoint_bytes(), self.keep, existing)
        if warning:
            log.warning(warning)

    def _failed(self, step: int, err: OSError) -> ckpt.NotWritableError:
        latest = ckpt.list_checkpoints(self.run_dir / "checkpoints")
        kept = f"then --resume; the last checkpoint, {latest[-1][1]}, is unchanged" if latest else "then run again"
        return ckpt.NotWritableError(
            f"the checkpoint of step {step} could not be written to {err.filename or self.run_dir} "
            f"({err.strerror or err}): {ckpt.write_remedy(err)}, {kept}"
        )
