"""The I-JEPA trainer: build everything from a Config, loop step -> log -> checkpoint, resume.

The loop reads the device once every ``run.log_every`` steps (loss, non-finite check), writes
metrics.csv / TensorBoard / a progress bar, and checkpoints atomically every
``run.checkpoint_every`` steps and at the end. SIGINT and SIGTERM finish the current step, save and
exit cleanly; a non-finite loss stops the run naming the step and leaves the last good checkpoint,
and weights are checked finite before each save, so no checkpoint holds non-finite weights. One
trainer at a time uses a run folder (``run_folder.RunLock``, taken by rank 0 for all ranks); at the
start it deletes the temporary files a killed run left, and a resume checks config.yaml.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ijepa_fast import checkpoint as ckpt
from ijepa_fast import distributed, run_folder
from ijepa_fast.config import Config
from ijepa_fast.masks import MaskBatch
from ijepa_fast.metrics import DeviceMeter, MetricsWriter, plot_loss
from ijepa_fast.models.attention import resolve_backend
from ijepa_fast.models.ijepa import build_models
from ijepa_fast.models.vit import grid_size
from ijepa_fast.schedules import Schedules
from ijepa_fast.step import StepOptions, TrainStep, autocast_dtype, build_optimizer

log = logging.getLogger("ijepa_fast")


class NonFiniteLossError(RuntimeError):
    """The training loss, or the weights about to be saved, became NaN or infinite."""


@dataclass
class RunResult:
    run_dir: Path
    steps: int  # optimizer steps done in total (including before a resume)
    last_loss: float  # mean loss of the last logging window
    skipped: int  # undecodable images skipped (and counted) by this process
    stopped: str  # "finished" | "signal"
    checkpoint: Path | None


def resolve_device(name: str, option: str = "run.device") -> torch.device:
    """``auto`` -> CUDA when available, else the CPU; a CUDA device without CUDA names ``option``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option}={name!r} but no CUDA device is available; use {option}=cpu")
    return dev


def mask_kwargs(cfg: Config) -> dict:
    """Keyword arguments of MultiBlockMaskSampler from the mask section."""
    m = cfg.mask
    return dict(
        num_pred_masks=m.num_pred_masks,
        pred_scale=tuple(m.pred_mask_scale),
        enc_scale=tuple(m.enc_mask_scale),
        aspect_ratio=tuple(m.aspect_ratio),
        min_keep=m.min_keep,
        allow_overlap=m.allow_overlap,
    )


def compile_blocks(module: torch.nn.Module) -> None:
    """Regional compilation: each transformer block on its own, so compile time stays small."""
    from ijepa_fast.models.vit import Block

    for sub in module.modules():
        if isinstance(sub, Block):
            sub.compile()


def build_models_for(cfg: Config, device: torch.device):
    """(student, target encoder) on ``device`` with the attention backend, checkpointing and compile
    switches of ``cfg.speed`` applied."""
    from ijepa_fast.models.vit import vit_size

    size = vit_size(cfg.model.name)
    enc_backend = resolve_backend(cfg.speed.attention, device, size.embed_dim // size.num_heads)
    pred_backend = resolve_backend(cfg.speed.attention, device, cfg.model.pred_emb_dim // size.num_heads)
    student, target = build_models(
        cfg.model, cfg.data.crop_size, attention=enc_backend, fused_gather=cfg.speed.fused_gather, loss=cfg.optim.loss
    )
    student.predictor.set_attention_backend(pred_backend)
    for module in (student.encoder, student.predictor):
        module.activation_checkpointing = cfg.speed.activation_checkpointing
    student.to(device)
    target.to(device)
    if cfg.speed.compile == "on" or (cfg.speed.compile == "auto" and device.type == "cuda"):
        compile_blocks(student)
        compile_blocks(target)
    log.info(
        "model %s/%d at %d px: encoder %.1fM params, predictor %.1fM; attention %s (encoder) / %s "
        "(predictor); device %s",
        cfg.model.name,
        cfg.model.patch_size,
        cfg.data.crop_size,
        _millions(student.encoder),
        _millions(student.predictor),
        enc_backend,
        pred_backend,
        device,
    )
    return student, target


def build_loader(
    cfg: Config,
    grid: tuple[int, int] | int,
    device: torch.device,
    rank: int,
    world_size: int,
    start_step: int,
    run_dir: Path,
):
    """The pretraining loader ``data.loader`` names (auto: DALI on a GPU when installed and the data
    are images, else the PyTorch one); both yield the same ``Batch`` and resume at ``start_step``."""
    from ijepa_fast.data.dali.loader import resolve_loader_kind

    kwargs = dict(
        grid=grid,
        mask_kwargs=mask_kwargs(cfg),
        seed=cfg.run.seed,
        rank=rank,
        world_size=world_size,
        start_step=start_step,
    )
    if resolve_loader_kind(cfg.data, device) == "dali":
        from ijepa_fast.data.dali.loader import build_dali_loader

        # The verdicts of the image check are cached in the run folder: a resumed run skips the scan.
        log.info("data loader: DALI (%s)", "GPU decoding" if device.type == "cuda" else "CPU mode")
        return build_dali_loader(
            cfg.data,
            device=device if device.type == "cuda" else None,
            cache=run_dir / f"image_check.rank{rank}.json",
            **kwargs,
        )
    from ijepa_fast.data.loader import build_pretrain_loader

    return build_pretrain_loader(cfg.data, **kwargs)


def step_options(cfg: Config) -> StepOptions:
    return StepOptions(
        loss=cfg.optim.loss,
        grad_clip=cfg.optim.grad_clip,
        fused_ema=cfg.speed.fused_ema,
        fused_gather=cfg.speed.fused_gather,
        grad_scaler=cfg.speed.grad_scaler,
        sync_every_step=cfg.speed.sync_every_step,
    )


def build_train_step(cfg: Config, device: torch.device, steps_per_epoch: int) -> TrainStep:
    """The training step the trainer runs (models, optimizer, schedules, switches) from a Config."""
    student, target = build_models_for(cfg, device)
    optimizer = build_optimizer(student, cfg.optim, device, fused=cfg.speed.fused_optimizer)
    schedules = Schedules.from_config(cfg.optim, steps_per_epoch)
    return TrainStep(
        student,
        target,
        optimizer,
        schedules,
        device,
        autocast_dtype(device, cfg.run.dtype),
        step_options(cfg),
        grad_accum=cfg.optim.grad_accum,
    )


def build_deepspeed_step(cfg: Config, device: torch.device, steps_per_epoch: int, world_size: int):
    """The DeepSpeed step (ZeRO stage ``run.zero_stage``) over the same models and schedules."""
    from ijepa_fast.engine_deepspeed import DeepSpeedTrainStep, deepspeed_config

    ds_config = deepspeed_config(cfg, world_size, device_type=device.type, grad_accum=cfg.optim.grad_accum)
    student, target = build_models_for(cfg, device)
    schedules = Schedules.from_config(cfg.optim, steps_per_epoch)
    return DeepSpeedTrainStep(student, target, schedules, ds_config, device, step_options(cfg))


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, allow_config_change: bool = False):
        self.cfg = cfg.validate()
        self.resume = resume
        self.allow_config_change = allow_config_change  # on resume: see run_folder.write_config
        self.lock: run_folder.RunLock | None = None  # rank 0's, while building and fitting
        self.run_dir = Path(cfg.run.out_dir) / cfg.run.name
        self.dist_env = distributed.detect()
        self.engine = distributed.resolve_engine(cfg.run.engine, self.dist_env)
        self.rank, self.world_size = self.dist_env.rank, self.dist_env.world_size
        self.is_main = self.rank == 0
        if self.engine == "deepspeed":
            self.device = distributed.device_for(self.dist_env, cfg.run.device)
        else:
            self.device = resolve_device(cfg.run.device)
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------ building
    def build(self) -> None:
        try:
            self._build()
        except BaseException:
            self._release()
            raise

    def _build(self) -> None:
        cfg = self.cfg
        from ijepa_fast.data.loader import check_data_source

        if self.engine == "deepspeed":
            distributed.init(
                self.dist_env, deepspeed=True, device=self.device, timeout_s=cfg.run.dist_timeout_s or None
            )
        check_data_source(cfg.data)  # a missing or empty data source fails before any model is built
        self._on_main_then_agree(self._open_run_dir)
        state, ds_step = None, None
        if self.engine == "deepspeed":
            from ijepa_fast.engine_deepspeed import latest_step

            ds_step = latest_step(self.ds_dir) if self.resume else None
            found = ds_step is not None
        else:
            state = ckpt.load_latest(self.run_dir / "checkpoints") if self.resume else None
            found = state is not None
        if self.resume and not found:
            log.warning(
                "--resume: no checkpoint in %s, starting from scratch",
                self.ds_dir if self.engine == "deepspeed" else self.run_dir / "checkpoints",
            )
        self.start_step = int(state["step"]) if state else (ds_step or 0)
        resumed = self.start_step if found else None
        self._on_main_then_agree(
            lambda: run_folder.write_config(self.run_dir, cfg, resumed, allow_change=self.allow_config_change)
        )

        torch.manual_seed(cfg.run.seed)
        self.grid = grid_size(cfg.data.crop_size, cfg.model.patch_size)
        # The loader counts micro-batches; a step (schedules, logs, checkpoints) is one optimizer step
        # of grad_accum of them, so a resumed run restarts the loader at step x grad_accum.
        self.accum = cfg.optim.grad_accum
        self.loader = build_loader(
            cfg, self.grid, self.device, self.rank, self.world_size, self.start_step * self.accum, self.run_dir
        )
        self.steps_per_epoch = self.loader.steps_per_epoch // self.accum
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"optim.grad_accum={self.accum} exceeds the {self.loader.steps_per_epoch} "
                f"micro-batches of one epoch on this rank"
            )
        if self.engine == "deepspeed":
            self.step_fn = build_deepspeed_step(cfg, self.device, self.steps_per_epoch, self.world_size)
        else:
            self.step_fn = build_train_step(cfg, self.device, self.steps_per_epoch)
        self.student, self.target = self.step_fn.student, self.step_fn.target_encoder
        self.optimizer, self.schedules = self.step_fn.optimizer, self.step_fn.schedules
        total = cfg.optim.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.optim.max_steps) if cfg.optim.max_steps else total
        if state:
            self._load_state(state)
        if ds_step is not None:
            self._check_model(self.step_fn.load_checkpoint(self.ds_dir, ds_step))
            log.info("resumed from step %d (%s)", self.start_step, self.ds_dir)
        self.writer = (
            MetricsWriter(self.run_dir, cfg.run.tensorboard, start_step=self.start_step)
            if self.is_main
            else _NoWriter()
        )

    @property
    def ds_dir(self) -> Path:
        return self.run_dir / "deepspeed"

    def _on_main_then_agree(self, action) -> None:
        """Run ``action`` on rank 0 only; when it fails, every rank raises (rank 0 its own error), so
        no rank is left waiting in a collective that rank 0 never reaches."""
        error = None
        if self.is_main:
            try:
                action()
            except Exception as err:
                error = err
        if distributed.any_rank(error is not None, self.device):
            raise error or run_folder.RunFolderError(
                f"rank 0 could not prepare the run folder {self.run_dir}; its log says why"
            )

    def _open_run_dir(self) -> None:
        """Rank 0: lock the run folder, refuse to start over a run without --resume, and delete the
        temporary files that a killed run left (no other trainer writes there now)."""
        from ijepa_fast.engine_deepspeed import remove_partial_files

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lock = run_folder.RunLock(self.run_dir)
        self.lock.acquire()
        if ckpt.list_checkpoints(self.run_dir / "checkpoints") and not self.resume:
            raise FileExistsError(
                f"run folder {self.run_dir} already holds checkpoints: pass --resume to continue "
                f"it, or choose another run.name / run.out_dir"
            )
        removed = ckpt.remove_partial_files(self.run_dir / "checkpoints") + remove_partial_files(self.ds_dir)
        if removed:
            log.warning(
                "removed %d partial file(s) of an interrupted save: %s", len(removed), ", ".join(map(str, removed))
            )

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _epoch(self, step: int) -> int:
        """The epoch of optimizer step ``step`` (the loader's epochs count micro-batches)."""
        return step * self.accum // self.loader.steps_per_epoch

    def _meta(self, step: int, last_loss: float) -> dict:
        """What a checkpoint holds besides weights and optimizer state (the same on every rank)."""
        return {
            "epoch": self._epoch(step),
            "loss": last_loss,
            "batch_size": self.cfg.data.batch_size,
            "world_size": self.world_size,
            "lr": self.schedules.lr_at(max(step - 1, 0)),
            "schedules": self.schedules.state_dict(),
            "mask_sampler": {"seed": self.cfg.run.seed, "grid": self.grid, **mask_kwargs(self.cfg)},
            "config": self.cfg.to_dict(),
        }

    def _state(self, step: int, last_loss: float) -> dict:
        return {
            "encoder": self.student.encoder.state_dict(),
            "predictor": self.student.predictor.state_dict(),
            "target_encoder": self.target.state_dict(),
            "opt": self.optimizer.state_dict(),
            **self._meta(step, last_loss),
            "rng": ckpt.rng_state(),
        }

    def _check_model(self, state: dict) -> None:
        saved = state.get("config", {}).get("model", {})
        if saved and saved != self.cfg.to_dict()["model"]:
            raise ValueError(
                f"--resume: the checkpoint's model {saved} differs from the config's {self.cfg.to_dict()['model']}"
            )

    def _load_state(self, state: dict) -> None:
        self._check_model(state)
        self.student.encoder.load_state_dict(state["encoder"])
        self.student.predictor.load_state_dict(state["predictor"])
        self.target.load_state_dict(state["target_encoder"])
        self.optimizer.load_state_dict(state["opt"])
        ckpt.set_rng_state(state["rng"])
        log.info("resumed from step %d (%s)", self.start_step, self.run_dir / "checkpoints")

    # ------------------------------------------------------------------ the loop
    def fit(self) -> RunResult:
        if not hasattr(self, "step_fn"):
            self.build()
        try:
            return self._fit()
        finally:
            self._release()

    def _fit(self) -> RunResult:
        cfg, step = self.cfg, self.start_step
        meter, bar = DeviceMeter(self.device), self._progress_bar()
        skipped, last_loss, last_ckpt, saved_step = 0, float("nan"), None, None
        window_start, window_images = time.perf_counter(), 0
        started = time.perf_counter()
        log.info(
            "training steps %d..%d (%d per epoch), global batch %d = %d per rank x %d rank(s) x %d "
            "accumulation, engine %s",
            step,
            self.total_steps,
            self.steps_per_epoch,
            cfg.data.batch_size * self.world_size * self.accum,
            cfg.data.batch_size,
            self.world_size,
            self.accum,
            self.engine,
        )
        between_steps = True  # with grad_accum > 1 a step spans several batches: stop only between steps
        with _StopOnSignals(self):
            for batch in self.loader:
                if between_steps and (step >= self.total_steps or self._should_stop(step)):
                    break
                images = batch.images.to(self.device, non_blocking=True)
                masks = _masks_to(batch.masks, self.device)
                out = self.step_fn(images, masks, step)
                meter.update(out["loss"], step)
                skipped += batch.skipped
                window_images += images.shape[0] * self.world_size
                between_steps = self.step_fn.stepped
                if not between_steps:  # more micro-batches of this step to come
                    continue
                step += 1
                if step % cfg.run.log_every == 0 or step % cfg.run.checkpoint_every == 0 or step == self.total_steps:
                    last_loss = self._log(
                        meter,
                        step,
                        window_images / (time.perf_counter() - window_start),
                        skipped,
                        time.perf_counter() - started,
                        bar,
                    )
                    window_start, window_images = time.perf_counter(), 0
                if step % cfg.run.checkpoint_every == 0:
                    last_ckpt, saved_step = self._save(step, last_loss), step
            if meter.count:  # a signal between two log points: check and log what is pending
                last_loss = self._log(meter, step, 0.0, skipped, time.perf_counter() - started, bar)
            if saved_step != step:
                last_ckpt = self._save(step, last_loss)
        return self._finish(step, last_loss, skipped, last_ckpt, bar)

    def _should_stop(self, step: int) -> bool:
        """A signal stops the run; with several ranks they agree at logging points (one host sync),
        so every rank leaves the loop at the same step."""
        if self.world_size == 1:
            return self._stop_signal is not None
        if step % self.cfg.run.log_every:
            return False
        return distributed.any_rank(self._stop_signal is not None, self.device)

    def _log(self, meter: DeviceMeter, step: int, ips: float, skipped: int, elapsed: float, bar) -> float:
        loss, bad_step = meter.read()  # the one host sync of this window
        if bad_step >= 0:  # the meter holds the 0-based step index; logs count steps from 1
            raise NonFiniteLossError(
                f"the loss became non-finite at step {bad_step + 1}; stopping ({self._last_good()})"
            )
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
        }
        self.writer.write(row)
        if bar is not None:
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{ips:.0f}", skipped=skipped)
        elif self.is_main:
            log.info("step %d loss %.4f lr %.2e %.0f img/s", step, loss, row["lr"], ips)
        return loss

    def _save(self, step: int, loss: float) -> Path | None:
        """Plain: one checkpoint file. DeepSpeed (collective): the engine checkpoint in run_dir/deepspeed,
        then a consolidated fp32 export in run_dir/checkpoints (rank 0; what ijepa-eval reads)."""
        self._check_weights(step)
        keep = self.cfg.run.keep_checkpoints
        if self.engine == "deepspeed":
            meta = self._meta(step, loss)
            tag = self.step_fn.save_checkpoint(self.ds_dir, step, meta, keep=keep)
            path = self.step_fn.export_consolidated(
                self.run_dir / "checkpoints", step, {**meta, "rng": ckpt.rng_state()}, keep=keep
            )
            log.info("checkpoint %s (DeepSpeed: %s)", path, tag)
            return path
        path = ckpt.save_checkpoint(self.run_dir / "checkpoints", self._state(step, loss), step, keep)
        log.info("checkpoint %s", path)
        return path

    def _check_weights(self, step: int) -> None:
        """Stop before saving non-finite weights (one reduction on the device; a save reads the weights
        to the host anyway, so reading its result adds no sync). Collective under DeepSpeed."""
        if not bool(self.step_fn.weights_finite()):
            raise NonFiniteLossError(
                f"the weights became non-finite by step {step}; stopping without saving them ({self._last_good()})"
            )

    def _last_good(self) -> str:
        good = ckpt.newest_loadable(self.run_dir / "checkpoints")
        return f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"

    def _progress_bar(self):
        if not self.cfg.run.progress or not self.is_main:
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.start_step, desc="pretrain", unit="step", dynamic_ncols=True)

    def _finish(self, step: int, loss: float, skipped: int, last_ckpt: Path | None, bar) -> RunResult:
        if bar is not None:
            bar.close()
        self.writer.close()
        if self.is_main:
            plot_loss(self.run_dir / "metrics.csv", self.run_dir / "loss.png")
        if self.engine == "deepspeed":
            distributed.cleanup()
        stopped = "signal" if self._stop_signal is not None else "finished"
        bad = self.loader.skipped_paths if hasattr(self.loader, "skipped_paths") else []
        log.info(
            "%s at step %d: last loss %.4f, %d undecodable image(s) skipped%s",
            stopped,
            step,
            loss,
            skipped,
            f" ({len(bad)} distinct files)" if bad else "",
        )
        return RunResult(self.run_dir, step, loss, skipped, stopped, last_ckpt)


class _NoWriter:
    """Ranks other than 0 write no metrics."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _StopOnSignals:
    """SIGINT/SIGTERM set a flag the loop reads between steps (then it saves and exits)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.trainer._stop_signal is not None:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.trainer._stop_signal = signum
        log.warning("signal %d received: finishing this step, saving a checkpoint and exiting", signum)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def _masks_to(masks: MaskBatch, device: torch.device) -> MaskBatch:
    if masks.context.device == device:
        return masks
    return MaskBatch(
        context=masks.context.to(device, non_blocking=True), targets=masks.targets.to(device, non_blocking=True)
    )


def _millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6
