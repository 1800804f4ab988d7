"""The training loop: step -> log -> checkpoint, with resume and clean stops.

The loop reads the device once every ``run.log_every`` steps (loss, non-finite check, and the
collapse monitors the step measured on that step's batch: the target features' per-dimension std and
RankMe, with a warning when RankMe falls to collapse), writes metrics.csv / TensorBoard / a progress
bar, and has the engine checkpoint every ``run.checkpoint_every`` steps and at the end
(``train.checkpointing``). Between steps, outside the time images/s counts, it runs the
``on_epoch_end`` callback and the online probe (``train.hooks``, ``train.online_probe``), whose
scores join that step's logged row. SIGINT and
SIGTERM finish the current step, save and exit (``RunResult.stop_signal`` says which); a second one
stops at once, without saving. A non-finite loss (or gradient) stops the run naming the step; the
step skipped it and every later one on the device (``step``), so with an engine that can skip, the
weights are still those before it and are saved as the checkpoint of the steps before it. Weights
are checked finite before each save, so no checkpoint holds non-finite weights. One trainer at a
time uses a run folder (``run_folder.RunLock``, taken by rank 0 for all ranks); at the start it
deletes the temporary files a killed run left, and a resume checks config.yaml. What is built
(models, engine, loader, step) comes from ``train.build`` and ``data.build``; signals are caught by ``train.signals``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ijepa_fast.config import Config
from ijepa_fast.data.build import build_loader
from ijepa_fast.data.device_feed import DeviceFeed
from ijepa_fast.engines import resolve_engine
from ijepa_fast.models.vit import grid_size
from ijepa_fast.runtime import distributed
from ijepa_fast.runtime.device import resolve_precision
from ijepa_fast.train import run_folder
from ijepa_fast.train.build import (
    build_engine,
    check_resume,
    check_run_folder,
    models_for_run,
    open_run_folder,
    start_process,
    train_step_for,
)
from ijepa_fast.train.checkpointing import Checkpointer
from ijepa_fast.train.checkpointing import NonFiniteLossError as NonFiniteLossError  # part of this module's API
from ijepa_fast.train.hooks import build_hooks
from ijepa_fast.train.metrics import (
    WANDB_ID_FILE,
    CollapseWatch,
    DeviceMeter,
    MetricsWriter,
    WandbLogger,
    check_wandb,
    plot_loss,
    read_metrics,
    wandb_mode,
)
from ijepa_fast.train.online_probe import PLOT_NAME as PROBE_PLOT
from ijepa_fast.train.online_probe import plot_curve as plot_probe_curve
from ijepa_fast.train.signals import Aborted as Aborted  # part of this module's API
from ijepa_fast.train.signals import StopOnSignals

log = logging.getLogger("ijepa_fast")

RUN_FOLDER_SETTINGS = "run.out_dir or run.name"  # what chooses the run folder, named in its errors
# The run folder's files that are written by name (checkpoints are written to a new file and renamed);
# run.lock is refused by the lock itself. One that is a link is refused before anything is written.
RUN_FILES = (run_folder.CONFIG_NAME, "train.log", "metrics.csv", "loss.png", PROBE_PLOT, WANDB_ID_FILE)


@dataclass
class RunResult:
    run_dir: Path
    steps: int  # optimizer steps done in total (including before a resume)
    last_loss: float  # mean loss of the last logging window
    skipped: int  # undecodable images skipped (and counted) by this process
    stopped: str  # "finished" | "signal"
    checkpoint: Path | None
    stop_signal: int | None = None  # the signal that stopped the run (SIGINT, SIGTERM), if one did


class Trainer:
    """One run, built when constructed: the process, the run folder (locked on rank 0), the engine with
    its checkpoint restored on ``resume``, the loader at the restored step and the training step; a
    failure while building releases what it took. ``fit()`` trains it to the end or to a stop."""

    def __init__(
        self,
        cfg: Config,
        resume: bool = False,
        allow_config_change: bool = False,
        on_epoch_end: Callable[[int], None] | None = None,
    ):
        self.cfg = cfg.validate()
        self.resume = resume
        self.allow_config_change = allow_config_change  # on resume: see run_folder.write_config
        # called with the epoch number (from 1) after each whole epoch; a stop signal ends it where it is
        self.on_epoch_end = on_epoch_end
        self.lock: run_folder.RunLock | None = None  # rank 0's, while building and fitting
        self._resumed_ranks: tuple[int, int] | None = None  # rank 0, on resume: (the checkpoint's, this run's)
        self.run_dir = Path(cfg.run.out_dir) / cfg.run.name
        self.dist_env = distributed.detect()
        self.rank, self.world_size = self.dist_env.rank, self.dist_env.world_size
        self.is_main = self.rank == 0
        self.engine_name = resolve_engine(cfg.run.engine, self.world_size)
        self.signals = StopOnSignals()  # the first SIGINT/SIGTERM while fitting: finish the step, save, exit
        self._failed_on_every_rank = False  # set by _agree when it raises
        self._build_or_release()

    # ------------------------------------------------------------------ building
    def _build_or_release(self) -> None:
        """Engine first (restoring a checkpoint), then the loader at the restored step, then the step;
        a failure releases what was taken (the run folder's lock, the process group)."""
        try:
            self._build()
        except BaseException:
            self._release()
            if self._failed_on_every_rank:
                # No rank waits in a collective: leave the group in order, so that each process exits
                # with its own status rather than aborting in the group's teardown at exit.
                distributed.cleanup()
            raise

    def _build(self) -> None:
        cfg = self.cfg
        from ijepa_fast.data.sources import check_data_source

        self.device = start_process(cfg, self.dist_env)
        check_data_source(cfg.data)  # a missing or empty data source fails before any model is built
        if self.resume:
            check_resume(self.run_dir, self.engine_name, cfg.run.engine)
        self._agree(lambda: check_wandb(cfg.run.wandb), main_only=True)  # only rank 0 logs
        self._agree(self._open_run_dir, main_only=True)
        self._agree(lambda: check_run_folder(self.run_dir, self.engine_name, self.is_main, RUN_FOLDER_SETTINGS))
        self.precision = resolve_precision(self.device, cfg.run.dtype)
        if self.is_main:
            log.log(logging.WARNING if self.precision.slow else logging.INFO, "precision: %s", self.precision)
        torch.manual_seed(cfg.run.seed)
        self.grid = grid_size(cfg.data.crop_size, cfg.model.patch_size)
        self.engine = build_engine(
            cfg, *models_for_run(cfg, self.device, self.world_size), self.device, self.world_size
        )
        restored = self.engine.load(self.run_dir, check=self._check_checkpoint) if self.resume else None
        if self.resume and restored is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", self.run_dir)
        self.start_step = int(restored["step"]) if restored else 0
        self._restored_loss = float(restored.get("loss", math.nan)) if restored else math.nan
        if restored:
            log.info("resumed from step %d (%s)", self.start_step, self.run_dir)
        self.saver = Checkpointer(
            self.engine, self.run_dir, cfg.run.keep_checkpoints, self._meta, self.start_step, cfg.run.async_checkpoint
        )
        self._agree(self.saver.check_space, main_only=True)  # a disk too small fails before step 0
        # The loader counts micro-batches; a step (schedules, logs, checkpoints) is one optimizer step
        # of grad_accum of them, so a resumed run restarts the loader at step x grad_accum.
        self.accum = cfg.optim.grad_accum
        self.loader = build_loader(
            cfg, self.grid, self.device, self.rank, self.world_size, self.start_step * self.accum
        )
        self.steps_per_epoch = self.loader.steps_per_epoch // self.accum
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"optim.grad_accum={self.accum} exceeds the {self.loader.steps_per_epoch} "
                f"micro-batches of one epoch on this rank"
            )
        self.step_fn = train_step_for(cfg, self.engine, self.steps_per_epoch)
        self.schedules = self.step_fn.schedules
        total = cfg.optim.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.optim.max_steps) if cfg.optim.max_steps else total
        if self.start_step >= self.total_steps > 0 and restored:
            log.info(
                "the run ended at step %d: nothing left to train (optim.epochs or max_steps set the length)",
                self.start_step,
            )
        self._agree(lambda: self._write_config(restored), main_only=True)
        self.writer = _NoWriter()
        self._agree(self._open_writer, main_only=True)  # W&B can refuse (online, no API key): every rank stops
        self.collapse_watch = CollapseWatch()
        self.hooks = build_hooks(self, self.on_epoch_end)

    def _open_writer(self) -> None:
        cfg = self.cfg
        mode = wandb_mode(cfg.run.wandb)
        resumed = self.start_step > 0
        wandb = WandbLogger(self.run_dir, mode, cfg.run.name, cfg.to_dict(), resumed) if mode else None
        self.writer = MetricsWriter(self.run_dir, cfg.run.tensorboard, start_step=self.start_step, wandb=wandb)

    def _agree(self, action, main_only: bool = False) -> None:
        """Run ``action`` (on rank 0 only, or on every rank); when it fails anywhere, every rank raises
        (a failed rank its own error), so no rank is left waiting in a collective."""
        failed, error = distributed.failure_on_any_rank(action, self.device, run=self.is_main or not main_only)
        if failed:
            self._failed_on_every_rank = True
            raise error or run_folder.RunFolderError(
                f"another rank could not prepare the run folder {self.run_dir}; its log says why"
            )

    def _open_run_dir(self) -> None:
        """Rank 0: ``build.open_run_folder`` (config.yaml is written once every check has passed:
        ``_write_config``)."""
        self.lock, self._resumed_ranks = open_run_folder(
            self.run_dir, self.cfg, self.engine_name, self.world_size, self.resume, self.allow_config_change, RUN_FILES
        )

    def _write_config(self, restored: dict | None) -> None:
        """Rank 0, once every check has passed: config.yaml. On resume it is compared once more with
        the run's stored config, the checkpoint's when config.yaml is gone (see run_folder)."""
        resumed, saved = (int(restored["step"]), restored.get("config")) if restored else (None, None)
        run_folder.write_config(
            self.run_dir, self.cfg, resumed, self.allow_config_change, self._resumed_ranks, saved=saved
        )

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def close(self) -> None:
        """Release the run folder without training (``fit`` releases it when it ends)."""
        self._release()

    def _check_checkpoint(self, state: dict) -> None:
        """Every rank, before the checkpoint is applied: its model must be the config's. The ranks
        agree (one collective), so that all of them stop in order when it is not."""
        self._agree(lambda: self._check_model(state))

    def _check_model(self, state: dict) -> None:
        saved = state.get("config", {}).get("model", {})
        ours = asdict(self.cfg.model)
        # keys added to ModelConfig since the checkpoint was written read as their defaults
        if saved and {**asdict(type(self.cfg.model)()), **saved} != ours:
            raise ValueError(f"--resume: the checkpoint's model {saved} differs from the config's {ours}")

    def _epoch(self, step: int) -> int:
        """The epoch of optimizer step ``step`` (the loader's epochs count micro-batches)."""
        return step * self.accum // self.loader.steps_per_epoch

    def _meta(self, step: int, last_loss: float) -> dict:
        """What a checkpoint holds besides the engine's state (the same on every rank)."""
        return {
            "epoch": self._epoch(step),
            "loss": last_loss,
            "batch_size": self.cfg.data.batch_size,
            "world_size": self.world_size,
            "lr": self.schedules.lr_at(max(step - 1, 0)),
            "schedules": self.schedules.state_dict(),
            "mask_sampler": {"seed": self.cfg.run.seed, "grid": self.grid, **asdict(self.cfg.mask)},
            "config": self.cfg.to_dict(),
        }

    # ------------------------------------------------------------------ the loop
    def fit(self) -> RunResult:
        try:
            return self._fit()
        except NonFiniteLossError:
            self.saver.drain()  # the save of the steps before it, written in the background, ends first
            distributed.cleanup()  # every rank stops at the same step (the loss is averaged over ranks)
            raise
        finally:
            self.saver.drain()  # a background write finishes before the run folder is released
            self._release()

    def _fit(self) -> RunResult:
        cfg, step = self.cfg, self.start_step
        meter, bar = DeviceMeter(self.device), self._progress_bar()
        skipped, last_loss, last_ckpt = 0, self._restored_loss, None
        self._last_loss = last_loss  # for a stop on a non-finite step
        self._bad_files: set[str] = set()  # of the batches trained on (the loader also reads one ahead)
        window_start, window_images = time.perf_counter(), 0
        started = time.perf_counter()
        per = (cfg.data.batch_size * self.world_size * self.accum, cfg.data.batch_size, self.world_size, self.accum)
        log.info(
            "training steps %d..%d (%d per epoch), global batch %d = %d per rank x %d rank(s) x %d accumulation, "
            "engine %s",
            *(step, self.total_steps, self.steps_per_epoch, *per, self.engine_name),
        )
        between_steps = True  # with grad_accum > 1 a step spans several batches: stop only between steps
        with self.signals:
            for batch in DeviceFeed(self.loader, self.device):  # on CUDA one batch ahead, on a side stream
                if between_steps and (step >= self.total_steps or self._should_stop(step)):
                    break
                images = batch.images
                out = self.step_fn(images, batch.masks, step, monitor=self._logs_at(step + 1))
                meter.update(out, step)
                skipped += batch.skipped
                self._bad_files.update(batch.bad_paths)
                window_images += images.shape[0] * self.world_size
                between_steps = self.step_fn.stepped
                if not between_steps:  # more micro-batches of this step to come
                    continue
                step += 1
                paused, scores = self.hooks.run(step)  # before the log: the probe's scores join the step's row
                window_start += paused  # images/s counts training time only
                if self._logs_at(step):
                    now = time.perf_counter()
                    rate = window_images / (now - window_start)
                    last_loss = self._log(meter, step, rate, skipped, now - started, bar, scores)
                    window_start, window_images = now, 0
                if step % cfg.run.checkpoint_every == 0:
                    last_ckpt = self.saver.save(step, last_loss)
            if meter.count:  # a signal between two log points: check and log what is pending
                last_loss = self._log(meter, step, 0.0, skipped, time.perf_counter() - started, bar)
            if self.saver.saved_step != step and (step > self.start_step or self.start_step == 0):
                last_ckpt = self.saver.save(step, last_loss)  # a resume that trained nothing has its checkpoint
            self.saver.join()  # the last write ends (or fails, naming its file) before the run reports
        return self._finish(step, last_loss, skipped, last_ckpt, bar)

    def _logs_at(self, step: int) -> bool:
        """Whether the loop reads the device after ``step`` steps (the step measures the monitors then)."""
        run = self.cfg.run
        due = step % run.log_every == 0 or step % run.checkpoint_every == 0 or step == self.total_steps
        return due or self.hooks.probe_due(step)

    def _should_stop(self, step: int) -> bool:
        """A signal stops the run; with several ranks they agree at logging points (one host sync),
        so every rank leaves the loop at the same step."""
        if self.world_size == 1:
            return self.signals.received is not None
        if step % self.cfg.run.log_every:
            return False
        return distributed.any_rank(self.signals.received is not None, self.device)

    def _log(self, meter: DeviceMeter, step: int, ips: float, skipped: int, elapsed: float, bar, scores=None) -> float:
        reading = meter.read()  # the one host sync of this window
        loss = reading.loss
        if reading.first_bad_step >= 0:  # the meter holds the 0-based step index; logs count steps from 1
            self.saver.save_before_non_finite(reading.first_bad_step, self._last_loss)
            raise NonFiniteLossError(
                f"the loss or its gradients became non-finite at step {reading.first_bad_step + 1}; "
                f"stopping ({self.saver.last_good()})"
            )
        self._last_loss = loss
        collapse = self.collapse_watch.check(step, reading.monitors)
        if collapse and self.is_main:
            log.warning(collapse)
        s = step - 1
        row = {
            "step": step,
            "epoch": self._epoch(s),
            "loss": loss,
            "lr": self.schedules.lr_at(s),
            "wd": self.schedules.wd_at(s),
            "momentum": self.schedules.momentum_at(s),
            "images_per_s": ips,
            "skipped": skipped,
            "elapsed_s": round(elapsed, 3),
            **reading.monitors,
            **(scores or {}),
        }
        self.writer.write(row)
        if bar is not None:
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{ips:.0f}", skipped=skipped)
        elif self.is_main:
            log.info("step %d loss %.4f lr %.2e %.0f img/s", step, loss, row["lr"], ips)
        return loss

    def _progress_bar(self):
        if not self.cfg.run.progress or not self.is_main:
            return None
        from ijepa_fast.runtime.progress import ProgressBar

        return ProgressBar(
            total=self.total_steps, initial=self.start_step, desc="pretrain", unit="step", dynamic_ncols=True
        )

    def _finish(self, step: int, loss: float, skipped: int, last_ckpt: Path | None, bar) -> RunResult:
        if bar is not None:
            bar.close()
        self.writer.close()
        if self.is_main:
            plot_loss(self.run_dir / "metrics.csv", self.run_dir / "loss.png")
            if self.hooks.probe is not None:
                plot_probe_curve(read_metrics(self.run_dir / "metrics.csv"), self.run_dir / PROBE_PLOT)
        distributed.cleanup()
        stopped = "signal" if self.signals.received is not None else "finished"
        bad = self._bad_files
        log.info(
            "%s at step %d: last loss %.4f, %d undecodable image(s) skipped%s",
            stopped,
            step,
            loss,
            skipped,
            f" ({len(bad)} distinct files)" if bad else "",
        )
        return RunResult(self.run_dir, step, loss, skipped, stopped, last_ckpt, self.signals.received)


class _NoWriter:
    """Ranks other than 0 write no metrics."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass
