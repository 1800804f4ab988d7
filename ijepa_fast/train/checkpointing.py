"""When and how the trainer saves: the engine's checkpoint after a finite-weights check, one error
naming the file for a failed write, and the save of the weights from before a non-finite step."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from ijepa_fast.io import checkpoint as ckpt
from ijepa_fast.train.step import Engine

log = logging.getLogger("ijepa_fast")


class NonFiniteLossError(RuntimeError):
    """The training loss, or the weights about to be saved, became NaN or infinite."""


class Checkpointer:
    """Saves ``engine`` into ``run_dir`` (``meta(step, loss)``: what a checkpoint holds besides the
    engine's state); ``saved_step`` is the step of this process's last save (None: none yet)."""

    def __init__(self, engine: Engine, run_dir: Path, keep: int, meta: Callable[[int, float], dict], start_step: int):
        self.engine, self.run_dir, self.keep, self.meta = engine, Path(run_dir), keep, meta
        self.start_step = start_step
        self.saved_step: int | None = None

    def save(self, step: int, loss: float) -> Path | None:
        """The engine's checkpoint (collective under DeepSpeed); its path on rank 0. A failed write (a
        full disk...) is one error that names the file and what to do."""
        self.check_weights(step)
        try:
            path = self.engine.save(self.run_dir, step, self.meta(step, loss), self.keep)
        except OSError as err:
            latest = ckpt.list_checkpoints(self.run_dir / "checkpoints")
            kept = f"then --resume; the last checkpoint, {latest[-1][1]}, is unchanged" if latest else "then run again"
            raise ckpt.NotWritableError(
                f"the checkpoint of step {step} could not be written to {err.filename or self.run_dir} "
                f"({err.strerror or err}): {ckpt.write_remedy(err)}, {kept}"
            ) from err
        self.saved_step = step
        if path is not None:
            log.info("checkpoint %s", path)
        return path

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
        good = ckpt.newest_loadable(self.run_dir / "checkpoints")
        return f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"
