"""How a run is assembled: its process, models, engine and training step from its config, and the
checks of its run folder that depend on the engine. The trainer and the profiler both call
``build_train_step``'s parts, so the profiler times the step that trains.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ijepa_fast.config import Config
from ijepa_fast.engines import engine_class, resolve_engine
from ijepa_fast.io import checkpoint as ckpt
from ijepa_fast.models.ijepa import compile_wanted, models_from_config
from ijepa_fast.models.target_copy import Bf16TargetCopy
from ijepa_fast.runtime import distributed
from ijepa_fast.runtime.device import resolve_precision
from ijepa_fast.runtime.distributed import DistEnv
from ijepa_fast.runtime.errors import ConfigError
from ijepa_fast.train import run_folder
from ijepa_fast.train.optim import build_optimizer
from ijepa_fast.train.schedules import Schedules
from ijepa_fast.train.step import Engine, StepOptions, TrainStep

log = logging.getLogger(__name__)


def check_run_folder(run_dir: Path, name: str, is_main: bool, setting: str) -> None:
    """Every folder engine ``name`` writes checkpoints to (on this rank) can be written: fail at start,
    not at the first checkpoint. ``setting`` names what chooses another run folder."""
    for folder, what in engine_class(name).checkpoint_folders(Path(run_dir), is_main):
        ckpt.check_writable(folder, what, setting)


def remove_partial_files(run_dir: Path) -> list[Path]:
    """Delete the temporary files an interrupted save of any engine left in ``run_dir``; return them.
    Only while no other process writes there (the trainer holds the run folder's lock)."""
    from ijepa_fast.engines.deepspeed import remove_partial_files_in

    run_dir = Path(run_dir)
    removed = ckpt.remove_partial_files(run_dir / "checkpoints") + remove_partial_files_in(run_dir / "deepspeed")
    if (run_dir / "fsdp2").is_dir():  # the engine's module imports torch.distributed: only for its runs
        removed += engine_class("fsdp2").remove_partial_files(run_dir)
    return removed


def open_run_folder(
    run_dir: Path, cfg: Config, engine: str, world_size: int, resume: bool, allow_config_change: bool, files
) -> tuple[run_folder.RunLock, tuple[int, int] | None]:
    """Rank 0, before any model is built: lock the run folder, refuse links in place of ``files``
    (the run's files written by name) and a start over a run without ``resume``, delete the
    temporary files a killed run left (no other trainer writes there now), and on resume compare
    the config with the run's config.yaml. Returns (the lock, held; on resume (the checkpoint's
    number of ranks, this run's), else None); a failure releases the lock."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_folder.RunLock(run_dir)
    lock.acquire()
    try:
        run_folder.refuse_links(run_dir, files)
        if ckpt.list_checkpoints(run_dir / "checkpoints") and not resume:
            raise FileExistsError(
                f"run folder {run_dir} already holds checkpoints: pass --resume to continue "
                f"it, or choose another run.name / run.out_dir"
            )
        removed = remove_partial_files(run_dir)
        if removed:
            names = ", ".join(map(str, removed))
            log.warning("removed %d partial file(s) of an interrupted save: %s", len(removed), names)
        resumed = engine_class(engine).latest_step(run_dir) if resume else None
        ranks = None if resumed is None else (engine_class(engine).saved_ranks(run_dir), world_size)
        run_folder.check_config(run_dir, cfg, resumed, allow_config_change, ranks)
    except BaseException:
        lock.release()
        raise
    return lock, ranks


SHARDED_ENGINES = ("deepspeed", "fsdp2")  # engines whose checkpoints live in a folder of their own


def run_engine(run_dir: Path) -> str | None:
    """The engine whose checkpoints ``run_dir`` holds (None: none). A sharded engine keeps them in a
    folder of its own (``checkpoints/`` then holds only its fp32 copies, without optimizer state); a
    plain run has ``checkpoints/`` alone."""
    for name in (*SHARDED_ENGINES, "plain"):
        if engine_class(name).latest_step(Path(run_dir)) is not None:
            return name
    return None


def check_resume(run_dir: Path, name: str, requested: str) -> None:
    """A resume runs the engine that wrote the run's checkpoints: another engine would not see them
    and would start over."""
    other = run_engine(run_dir)
    if other is not None and other != name:
        raise ValueError(
            f"--resume: {run_dir} holds the checkpoints of a run of the {other} engine, but this process runs "
            f"the {name} engine (run.engine={requested}): resume as the run was started (under torchrun or "
            f"the deepspeed launcher for DeepSpeed and FSDP2), or with run.engine={other}"
        )


def start_process(cfg: Config, env: DistEnv) -> torch.device:
    """This process's device; the process group is set up first when the engine needs one."""
    device = distributed.device_for(env, cfg.run.device)
    engine = resolve_engine(cfg.run.engine, env.world_size)
    if engine in SHARDED_ENGINES:  # FSDP2 needs a process group in a world of one too
        timeout_s = cfg.run.dist_timeout_s or None
        distributed.init(env, deepspeed=engine == "deepspeed", device=device, timeout_s=timeout_s)
    return device


def models_for_run(cfg: Config, device: torch.device, world_size: int = 1):
    """(student, target encoder) of a run for its engine: ``models_from_config``, with compile turned
    off (and a line in the log saying why) where the engine cannot run compiled blocks."""
    wanted = compile_wanted(cfg.speed.compile, device)
    if wanted and resolve_engine(cfg.run.engine, world_size) == "deepspeed":
        from ijepa_fast.engines.deepspeed import compile_refusal

        reason = compile_refusal(cfg.run.zero_stage)
        if reason:
            log.warning("speed.compile=%s: off, %s", cfg.speed.compile, reason)
            wanted = False
    return models_from_config(cfg, device, compile=wanted)


def build_engine(cfg: Config, student, target_encoder, device: torch.device, world_size: int = 1) -> Engine:
    """The engine ``run.engine`` names over ``student`` and ``target_encoder``."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the patch embedding's convolution, as the authors set it
    name = resolve_engine(cfg.run.engine, world_size)
    if name != "plain" and cfg.speed.grad_scaler:  # the authors' preset sets it: silently dropping it would hide that
        raise ConfigError(
            f"speed.grad_scaler=true: the {name} engine has no GradScaler (bf16 and fp32 need none, and its "
            "non-finite steps are skipped without one); set speed.grad_scaler=false or use run.engine=plain"
        )
    if name != "deepspeed" and cfg.run.ds_config:
        raise ConfigError(
            f"run.ds_config={cfg.run.ds_config} is read by the DeepSpeed engine only, and this run's engine is "
            f"{name} (run.engine={cfg.run.engine}): set run.engine=deepspeed, or drop run.ds_config"
        )
    if name == "deepspeed":
        from ijepa_fast.engines.deepspeed import DeepSpeedEngine, deepspeed_config

        if cfg.run.zero_stage == 3 and cfg.speed.fp8_target != "off":
            raise ConfigError(
                f"speed.fp8_target={cfg.speed.fp8_target} with run.zero_stage=3: ZeRO-3 partitions the target "
                "encoder's weights, which the float8 copy is made from; use zero_stage <= 2 or fp8_target=off"
            )
        ds_config = deepspeed_config(cfg, world_size, device_type=device.type, grad_accum=cfg.optim.grad_accum)
        return DeepSpeedEngine(student, target_encoder, ds_config, device)
    if name == "fsdp2":
        from ijepa_fast.engines.fsdp2.engine import FSDP2Engine

        precision = resolve_precision(device, cfg.run.dtype)
        if precision.loss_scaling:
            raise ConfigError("run.dtype=fp16 needs a GradScaler, which the fsdp2 engine has not: use bf16 or fp32")
        if cfg.speed.fp8_target != "off":
            raise ConfigError(
                f"speed.fp8_target={cfg.speed.fp8_target} with run.engine=fsdp2: FSDP2 shards the target encoder's "
                "weights, which the float8 copy is made from whole; use another engine or fp8_target=off"
            )
        amp = precision.autocast_dtype
        return FSDP2Engine(student, target_encoder, cfg.optim, device, amp, fused_optimizer=cfg.speed.fused_optimizer)
    from ijepa_fast.engines.plain import PlainEngine

    optimizer = build_optimizer(student, cfg.optim, device, fused=cfg.speed.fused_optimizer)
    scaler = cfg.speed.grad_scaler or resolve_precision(device, cfg.run.dtype).loss_scaling
    return PlainEngine(student, target_encoder, optimizer, device, grad_clip=cfg.optim.grad_clip, grad_scaler=scaler)


def train_step_for(cfg: Config, engine: Engine, steps_per_epoch: int) -> TrainStep:
    """The training step over ``engine``: the schedules, precision and speed switches of ``cfg``.
    Built after a checkpoint is restored: the bf16 target copy is cast from the restored weights."""
    options = StepOptions(
        fused_ema=cfg.speed.fused_ema, fused_gather=cfg.speed.fused_gather, sync_every_step=cfg.speed.sync_every_step
    )
    amp_dtype = resolve_precision(engine.device, cfg.run.dtype).autocast_dtype
    return TrainStep(
        engine,
        Schedules.from_config(cfg.optim, steps_per_epoch),
        amp_dtype,
        options,
        grad_accum=cfg.optim.grad_accum,
        target_copy=target_copy_for(cfg, engine, amp_dtype),
    )


def target_copy_for(cfg: Config, engine: Engine, amp_dtype: torch.dtype | None) -> Bf16TargetCopy | None:
    """``speed.bf16_target_copy``'s copy of ``engine``'s target encoder; None where it is off or has
    nothing to save (no bf16 autocast: the target forward casts nothing)."""
    if not cfg.speed.bf16_target_copy or amp_dtype != torch.bfloat16:
        return None
    if engine.shards_target:
        log.info("bf16 target copy: off, %s partitions the target encoder (each rank holds a shard)", engine.name)
        return None
    copy = Bf16TargetCopy(engine.target_encoder)
    log.info("bf16 target copy: %.1f MB of matmul weights, written by the EMA", copy.nbytes() / 1e6)
    return copy


def build_train_step(cfg: Config, device: torch.device, steps_per_epoch: int, world_size: int = 1) -> TrainStep:
    """A run's training step from scratch: models, engine and step (the profiler's entry point; the
    trainer makes the same calls with a checkpoint restored in between)."""
    models = models_for_run(cfg, device, world_size)
    return train_step_for(cfg, build_engine(cfg, *models, device, world_size), steps_per_epoch)
