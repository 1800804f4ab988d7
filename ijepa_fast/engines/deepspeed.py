"""The DeepSpeed ZeRO engine (stages 0-3): config generation, ``step.Engine``, ZeRO-aware EMA views,
checkpoints and a consolidated export.

The student (context encoder + predictor, ``JEPAStudent``) trains inside ``deepspeed.initialize``;
``step.TrainStep`` drives it like any engine: our schedules set each AdamW group's learning rate
and weight decay, the step divides the loss for gradient accumulation and DeepSpeed runs with
``managed_gradient_accumulation`` off, so every ``step()`` is an optimizer step. The target encoder:

- stages 0-2: a full replica on every rank, EMA over full parameters; every rank applies the same
  update to the same (all-gathered) student weights, so replicas agree.
- stage 3: partitioned exactly like the student by a second engine without optimizer. A parameter's
  partition depends only on its size and the world size, so ``target.ds_tensor`` and
  ``student.encoder.ds_tensor`` hold the same slice: the EMA runs shard by shard on the local
  partitions, with no collective. Only the target's forward gathers (layer by layer, as ZeRO-3
  does for any module). Its persistence thresholds are 0 so no gathered copy outlives a forward
  and goes stale after the EMA writes the partitions.

Precision: fp32 weights at every stage; ``run.dtype`` bf16 runs the forward under the step's bf16
autocast, as the plain engine and the authors do. So the EMA averages the fp32 weights (at stage 3,
this rank's fp32 partitions), gradients are fp32 and are reduced in fp32. DeepSpeed's ``bf16`` mode
is not used: it stores the weights, the residual stream and each rank's gradients in bf16, so it
would not compute the plain bf16 step (fp32 weights under autocast). The cost: fp32 weights and
gradients on every rank, and ZeRO-3 gathers fp32 weights. No step reads the device from
the host: the norm checks ZeRO 1-3 make after reducing the gradients (``bool()`` of a device tensor,
whatever DeepSpeed's config says) are skipped while ``step`` runs (``_no_norm_checks``).

A non-finite step is skipped on the device all the same when torch's AdamW inside is fused (the
generated config's default, on CUDA and CPU): DeepSpeed's own skip is a Python branch on that host
read (``if self.overflow`` in the ZeRO optimizers' ``step``), so instead the global gradient norm
they compute (ZeRO 1-3; at stage 0, the all-reduced gradients) and the step's loss flag become the
fused AdamW's ``found_inf``, which leaves every rank's weights, moments and step counts as they were.
DeepSpeed's own counters (``global_steps``) still count the step. Any other optimizer (ZeRO-Offload's
CPU Adam, a non-fused AdamW) applies it; the trainer stops at its next read of the loss either way.

Checkpoints go through the engine, plus one small file per rank with what differs per rank (RNG,
stage-3 target partitions) and the world size and ZeRO stage, checked before the engine loads;
``latest`` is written last, atomically, after every rank has finished. Every file is read back with
``checkpoint.load_file`` (weights only; DeepSpeed's own loader unpickles in full): its engine gets a
checkpoint engine whose ``load`` is ours, allowing only the plain records DeepSpeed stores
(``deepspeed_safe_globals``). ``export_consolidated`` writes a plain fp32 checkpoint in
``ijepa_fast.io.checkpoint``'s format (encoder / predictor / target_encoder state dicts) that
``ijepa-eval`` and ``interop.load_encoder`` read without DeepSpeed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ijepa_fast.engines import deepspeed_universal as uc
from ijepa_fast.io import checkpoint as ckpt
from ijepa_fast.masks.sampler import MaskBatch
from ijepa_fast.models.ijepa import JEPAStudent
from ijepa_fast.runtime import distributed as dist_
from ijepa_fast.runtime.errors import ConfigError
from ijepa_fast.runtime.optional import require
from ijepa_fast.train.optim import adamw_implementation, param_groups
from ijepa_fast.train.step import PhaseMark, all_finite

if TYPE_CHECKING:
    from ijepa_fast.config import Config

log = logging.getLogger(__name__)

_TAG = re.compile(r"^step_(\d{8,})$")
_RANK_FILE = "ijepa_rank{:05d}.pt"
_UNIVERSAL = "universal"  # save_dir/universal/<tag>: a tag converted for another number of ranks
_QUIET_STEPS = 2**31 - 1  # DeepSpeed's own progress print; the trainer logs


# ----------------------------------------------------------------------------- config


def _owned(cfg: Config, world_size: int, grad_accum: int) -> list[tuple[str, Any, str]]:
    """(DeepSpeed key, our value, where it comes from) for every value our config decides."""
    o = cfg.optim
    return [
        ("train_micro_batch_size_per_gpu", cfg.data.batch_size, f"data.batch_size={cfg.data.batch_size}"),
        ("gradient_accumulation_steps", grad_accum, f"gradient accumulation={grad_accum}"),
        (
            "train_batch_size",
            cfg.data.batch_size * world_size * grad_accum,
            f"data.batch_size={cfg.data.batch_size} x {world_size} ranks x {grad_accum} accumulation",
        ),
        ("zero_optimization.stage", cfg.run.zero_stage, f"run.zero_stage={cfg.run.zero_stage}"),
        (
            "bf16.enabled",
            False,
            f"run.dtype={cfg.run.dtype}: fp32 weights under the training step's autocast, so the EMA averages "
            "fp32 weights and gradients are fp32",
        ),
        ("torch_autocast.enabled", False, "the training step's own autocast"),
        ("managed_gradient_accumulation", False, "the training step's gradient accumulation"),
        (
            "checkpoint.load_universal",
            False,
            "--resume (a checkpoint of another number of ranks is converted and loaded as universal by the engine)",
        ),
        ("fp16.enabled", False, "run.dtype (fp16 is not supported; bf16 or fp32)"),
        ("gradient_clipping", float(o.grad_clip), f"optim.grad_clip={o.grad_clip}"),
        ("optimizer.params.lr", o.start_lr, f"optim.start_lr={o.start_lr} (then our schedule, every step)"),
        (
            "optimizer.params.weight_decay",
            o.weight_decay,
            f"optim.weight_decay={o.weight_decay} (then our schedule, every step)",
        ),
        ("optimizer.params.betas", list(o.betas), f"optim.betas={list(o.betas)}"),
        ("optimizer.params.eps", o.eps, f"optim.eps={o.eps}"),
    ]


def _get(d: Mapping, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return None
        d = d[part]
    return d


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[leaf] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, (bool, int)) and isinstance(b, (bool, int)) and bool(a) == bool(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_user_config(source: str | Path | Mapping | None) -> dict:
    """A user DeepSpeed config: a JSON file path, a mapping, or nothing (``{}``)."""
    if not source:
        return {}
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"run.ds_config={source} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"run.ds_config={source} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"run.ds_config={source} must hold a JSON object")
    return data


def deepspeed_config(
    cfg: Config,
    world_size: int,
    *,
    device_type: str = "cpu",
    grad_accum: int = 1,
    user: str | Path | Mapping | None = None,
) -> dict:
    """The DeepSpeed JSON config of a run, generated from ``cfg`` and merged with ``user``.

    Generated: micro batch = ``data.batch_size`` (per rank), ``gradient_accumulation_steps``,
    ``train_batch_size`` = micro x world x accumulation, ``zero_optimization.stage``, fp32 weights
    (``bf16`` off: the step's autocast computes in bf16), gradients reduced in fp32
    (``communication_data_type``), ``gradient_clipping`` and torch's AdamW (``torch_adam``: DeepSpeed
    builds no op; fused when ``speed.fused_optimizer``, as the plain engine).
    ``user`` (default: ``run.ds_config``) may add or override any other key (buckets, offload,
    communication dtype...); a value it gives for a key listed above that differs from ours is a
    ``ConfigError`` naming both keys and both values; ``"auto"`` means "take ours". A DeepSpeed
    ``scheduler`` is refused: our schedules set the learning rate.
    """
    if world_size < 1 or grad_accum < 1:
        raise ValueError(f"world_size={world_size} and grad_accum={grad_accum} must be >= 1")
    user_cfg = load_user_config(cfg.run.ds_config if user is None else user)
    if user is None:
        source = f"run.ds_config={cfg.run.ds_config}"
    else:
        source = "the user ds_config" if isinstance(user, Mapping) else str(user)
    owned = _owned(cfg, world_size, grad_accum)
    conflicts = []
    for key, ours, origin in owned:
        theirs = _get(user_cfg, key)
        if theirs is None or theirs == "auto":
            continue
        if not _same(theirs, ours):
            conflicts.append(f"{key}={theirs!r} in {source} conflicts with {key}={ours!r} from {origin}")
    if "scheduler" in user_cfg:
        conflicts.append(f"scheduler in {source} conflicts with our lr / weight-decay schedules (optim.*): remove it")
    opt_type = _get(user_cfg, "optimizer.type")
    if opt_type is not None and str(opt_type).lower() not in ("adamw", "adam"):
        conflicts.append(
            f"optimizer.type={opt_type!r} in {source} conflicts with optimizer.type='AdamW' (the method's optimizer)"
        )
    if conflicts:
        raise ConfigError("DeepSpeed config conflicts:\n  " + "\n  ".join(conflicts))

    ours: dict = {
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
        "communication_data_type": "fp32",
        "optimizer": {
            "type": "AdamW",
            "params": {"torch_adam": True, **adamw_implementation(device_type, cfg.speed.fused_optimizer)},
        },
    }
    for key, value, _ in owned:
        _set(ours, key, value)
    merged = _merge(ours, user_cfg)
    for key, value, _ in owned:  # "auto" and absent keys take ours
        if _get(merged, key) in (None, "auto"):
            _set(merged, key, value)
    if merged["optimizer"].get("type", "AdamW").lower() == "adam":  # Adam in DeepSpeed means AdamW unless told
        merged["optimizer"]["params"].setdefault("adam_w_mode", True)
    return merged


def target_config(ds_config: Mapping) -> dict:
    """The config of the stage-3 target-encoder engine: same partitioning, no optimizer, fp32."""
    out = copy.deepcopy(dict(ds_config))
    for key in ("optimizer", "scheduler", "gradient_clipping", "fp16", "bf16", "torch_autocast"):
        out.pop(key, None)
    zero = dict(out.get("zero_optimization", {}))
    zero.pop("offload_optimizer", None)
    # The EMA writes the partitions: a parameter kept gathered between forwards would go stale.
    zero["stage3_param_persistence_threshold"] = 0
    zero["stage3_model_persistence_threshold"] = 0
    out["zero_optimization"] = zero
    return out


def global_batch(ds_config: Mapping) -> tuple[int, int, int, int]:
    """(global batch, per-rank micro batch, ranks, accumulation steps) of a generated config."""
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    return ds_config["train_batch_size"], micro, ds_config["train_batch_size"] // (micro * accum), accum


def compile_refusal(zero_stage: int) -> str | None:
    """Why ``speed.compile`` is turned off at this ZeRO stage (None: it is not). DeepSpeed's ZeRO-3
    hooks around every module are compile-disabled: compiled blocks break into dozens of graphs
    and hit dynamo's recompile limit, and ``engine.compile`` (the whole model) does no better."""
    if zero_stage == 3:
        return "ZeRO-3's per-module parameter hooks break compiled blocks into many graphs (recompile limit)"
    return None


# ----------------------------------------------------------------------------- host syncs


@contextlib.contextmanager
def _no_norm_checks(on_norm: Callable[[torch.Tensor], None] | None = None):
    """While active, DeepSpeed's ZeRO optimizers take every gradient norm as valid instead of reading
    it to the host: their ``is_invalid_grad_norm`` is ``bool()`` of a device tensor, called once per
    step (``step`` of stage_1_and_2 and of stage3) and once per parameter group when clipping
    (stage_1_and_2's ``unscale_and_clip_grads``), whatever ``bf16.check_grad_overflow`` says. Each
    device norm goes to ``on_norm`` instead (before the optimizer steps), which may skip the step on
    the device; otherwise a non-finite norm clips the gradients to non-finite values, as in the plain
    engine, and the trainer stops at its next read of the loss. Numbers (not tensors) are still checked."""
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    checked = stage_1_and_2.is_invalid_grad_norm  # the same function in both modules

    def device_norms_pass(norm: Any) -> bool:
        if not torch.is_tensor(norm):
            return checked(norm)
        if on_norm is not None:
            on_norm(norm)
        return False

    modules = (stage_1_and_2, stage3)
    saved = [m.is_invalid_grad_norm for m in modules]
    for m in modules:
        m.is_invalid_grad_norm = device_norms_pass
    try:
        yield
    finally:
        for m, fn in zip(modules, saved):
            m.is_invalid_grad_norm = fn


# ----------------------------------------------------------------------------- safe loading


def deepspeed_safe_globals() -> list[type]:
    """The classes DeepSpeed pickles into ZeRO 0-3 checkpoints (fp32 and bf16) besides tensors and
    containers: plain records, rebuilt from data without running code. Found by loading real
    checkpoints of each stage with ``weights_only=True``; any other object is refused."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class _CheckpointFiles:
    """A DeepSpeed checkpoint engine whose ``load`` is ``checkpoint.load_file`` and, for torch's own
    file engine, whose ``save`` is ``checkpoint.atomic_torch_save``; everything else (commit, other
    writers configured through ``run.ds_config``) is the wrapped engine's.

    DeepSpeed's own ``load`` calls ``torch.load(weights_only=False)``, which runs whatever a planted
    object asks for. Its ``save`` writes in place through torch's C++ writer: a failed write (a full
    disk) leaves a truncated file and raises a RuntimeError that names no file. Saved atomically,
    each file is whole or absent, and a failed write is an OSError naming it."""

    def __init__(self, inner: Any):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        self._inner = inner
        self._allowed = deepspeed_safe_globals()
        self._atomic_saves = type(inner) is TorchCheckpointEngine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        # resuming has no override: DeepSpeed and this package store only plain records
        return ckpt.load_file(path, allowed=self._allowed, map_location=map_location, override=None)

    def save(self, state_dict: Any, path: str) -> None:  # DeepSpeed passes both by keyword
        if self._atomic_saves:
            ckpt.atomic_torch_save(state_dict, Path(path))
        else:
            self._inner.save(state_dict, path)


def _safe_checkpoint_files(engine: Any) -> Any:
    engine.checkpoint_engine = _CheckpointFiles(engine.checkpoint_engine)
    return engine


# ----------------------------------------------------------------------------- the engine


class DeepSpeedEngine:
    """Implements ``step.Engine`` with a DeepSpeed engine; every rank calls every method (collectives).

    ``forward`` takes this rank's micro batch; ``mean_over_ranks`` gives every rank the same loss,
    so a non-finite loss stops all of them at the same step.
    """

    name = "deepspeed"

    def __init__(self, student: JEPAStudent, target_encoder: nn.Module, ds_config: dict, device: torch.device):
        ds = require("deepspeed", "run.engine=deepspeed")
        self.ds_config = ds_config
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.device = device
        self.engine, self.optimizer, _, _ = ds.initialize(
            model=student, model_parameters=param_groups(student), config=ds_config
        )
        _safe_checkpoint_files(self.engine)
        # the torch optimizer DeepSpeed steps: the ZeRO optimizer's inner one, or at stage 0 itself
        self._torch_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        self.skips_non_finite = bool(getattr(self._torch_optimizer, "defaults", {}).get("fused"))
        self._finite: torch.Tensor | None = None  # the step's flag while engine.step() runs
        if self.skips_non_finite:
            self._torch_optimizer.register_step_pre_hook(self._pass_skip)
        self.student: JEPAStudent = self.engine.module
        if self.zero_stage == 3:
            self.target_engine = _safe_checkpoint_files(
                ds.initialize(model=target_encoder, config=target_config(ds_config))[0]
            )
            self.target_encoder = self.target_engine.module
            self._target_forward = self.target_engine
            self._check_partitions()
        else:
            self.target_engine = None
            self.target_encoder = target_encoder.to(device)
            self._target_forward = self.target_encoder
        total, micro, ranks, accum = global_batch(ds_config)
        log.info(
            "DeepSpeed ZeRO stage %d: global batch %d = %d per rank x %d ranks x %d accumulation",
            self.zero_stage,
            total,
            micro,
            ranks,
            accum,
        )

    # ------------------------------------------------------------------ the step's calls
    def forward(self, images: torch.Tensor, masks: MaskBatch, targets: torch.Tensor, mark: PhaseMark) -> torch.Tensor:
        return self.engine(images, masks.context, masks.targets, targets, mark=mark)

    def target_forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._target_forward(images)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the step already divided it

    def step(self, finite: torch.Tensor) -> torch.Tensor:
        self._finite = finite
        with _no_norm_checks(self._and_valid_norm):
            self.engine.step()  # unmanaged accumulation: reduce, clip, step, zero
        self._torch_optimizer.__dict__.pop("found_inf", None)  # ours, set by _pass_skip for this step only
        finite, self._finite = self._finite, None
        return finite

    def _and_valid_norm(self, norm: torch.Tensor) -> None:
        """ZeRO 1-3: the global gradient norm, the same on every rank (DeepSpeed makes a non-finite
        one inf or -1)."""
        self._finite = self._finite & (torch.isfinite(norm) & (norm >= 0)).all()

    def _pass_skip(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        """Step pre-hook of the fused AdamW (once per parameter group under ZeRO 1-2): this step's
        flag as its ``found_inf``. At stage 0 no ZeRO norm exists: the gradients it is about to
        apply, already all-reduced, are checked here."""
        if self.zero_stage == 0:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self._finite = self._finite & all_finite(grads)
        optimizer.found_inf = (~self._finite).float()

    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        return dist_.all_mean_(value.float().clone())

    # ------------------------------------------------------------------ EMA
    def _shards(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(target partitions, student-encoder partitions) of this rank, in parameter order."""
        t = [p.ds_tensor for p in self.target_encoder.parameters()]
        s = [p.ds_tensor for p in self.student.encoder.parameters()]
        return t, s

    def _check_partitions(self) -> None:
        pairs = zip(self.target_encoder.named_parameters(), self.student.encoder.named_parameters())
        for (tn, t), (sn, s) in pairs:
            if tn != sn or t.ds_shape != s.ds_shape or t.ds_tensor.numel() != s.ds_tensor.numel():
                raise RuntimeError(
                    f"ZeRO-3 partitions of target {tn} {tuple(t.ds_shape)} and encoder {sn} "
                    f"{tuple(s.ds_shape)} differ: the shard-local EMA needs identical layouts"
                )

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Stages 0-2: the full parameters. Stage 3: this rank's partitions only (no collective)."""
        if self.zero_stage == 3:
            return self._shards()
        return list(self.target_encoder.parameters()), list(self.student.encoder.parameters())

    def weights_finite(self) -> torch.Tensor:
        """Collective: 0-d bool tensor, the same on every rank, true when every rank's weights (its
        partitions under ZeRO-3) of the student and the target encoder are finite."""
        params = [*self.student.parameters(), *self.target_encoder.parameters()]
        local = all_finite([p.ds_tensor for p in params] if self.zero_stage == 3 else params)
        return dist_.all_mean_(local.float()) == 1.0  # the mean of 0/1 flags is 1 only if every rank says 1

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def tag(step: int) -> str:
        return f"step_{step:08d}"

    @staticmethod
    def checkpoint_folders(run_dir: Path, is_main: bool) -> list[tuple[Path, str]]:
        """(folder, what it is) of every folder this rank writes: its own files in ``deepspeed/``,
        and on rank 0 the consolidated export in ``checkpoints/``."""
        own = [(run_dir / "deepspeed", "the DeepSpeed checkpoints folder")]
        return own + ([(run_dir / "checkpoints", "the checkpoints folder")] if is_main else [])

    @staticmethod
    def latest_step(run_dir: Path) -> int | None:
        """The step ``run_dir/deepspeed/latest`` names (None: no DeepSpeed checkpoint)."""
        return latest_step(run_dir / "deepspeed")

    @staticmethod
    def saved_ranks(run_dir: Path) -> int | None:
        """The number of ranks that wrote the tag ``run_dir/deepspeed/latest`` names (None: none)."""
        step = latest_step(run_dir / "deepspeed")
        return None if step is None else saved_world_size(run_dir / "deepspeed" / DeepSpeedEngine.tag(step))

    def save(self, run_dir: Path, step: int, meta: dict, keep: int) -> Path | None:
        """Collective: the engine checkpoint in ``run_dir/deepspeed`` (what ``--resume`` reads), then
        a consolidated fp32 export in ``run_dir/checkpoints`` (what ijepa-eval reads; its path on
        rank 0, None elsewhere)."""
        run_dir = Path(run_dir)
        self.save_checkpoint(run_dir / "deepspeed", step, meta, keep=keep)
        return self.export_consolidated(run_dir / "checkpoints", step, {**meta, "rng": ckpt.rng_state()}, keep=keep)

    def load(self, run_dir: Path, check=None) -> dict | None:
        """Collective: restore ``run_dir/deepspeed``'s latest tag; ``check(client_state)`` may refuse
        it. Returns the client state (with ``step``) or None when there is no checkpoint."""
        return self.load_checkpoint(Path(run_dir) / "deepspeed", check=check)

    def save_checkpoint(self, save_dir: str | Path, step: int, client_state: dict | None = None, keep: int = 0) -> Path:
        """Collective: every rank calls it. Returns ``save_dir/step_XXXXXXXX``.

        ``client_state`` (schedules, sampler state, config...: the same on every rank) goes through
        the engine; the target encoder goes there too (stages 0-2) or, with the RNG state, into
        this rank's own file (its stage-3 partitions). ``keep`` > 0 deletes tags older than the
        newest ``keep`` up to this one; newer tags (left by an interrupted save: ``latest`` never
        named them) are neither counted nor deleted.
        """
        save_dir, tag = Path(save_dir), self.tag(step)
        rank, world = dist_.get_rank(), dist_.get_world_size()
        (save_dir / tag).mkdir(parents=True, exist_ok=True)
        own: dict[str, Any] = {
            "step": step,
            "rank": rank,
            "world_size": world,
            "zero_stage": self.zero_stage,
            "rng": ckpt.rng_state(),
        }
        if self.zero_stage == 3:
            own["target_partitions"] = [t.detach().cpu().clone() for t in self._shards()[0]]
        ckpt.atomic_torch_save(own, save_dir / tag / _RANK_FILE.format(rank))
        client = {**(client_state or {}), "step": step, "world_size": world, "zero_stage": self.zero_stage}
        if self.zero_stage < 3:
            client["target_encoder"] = {k: v.detach().cpu() for k, v in self.target_encoder.state_dict().items()}
        self.engine.save_checkpoint(str(save_dir), tag=tag, client_state=client, save_latest=False)
        dist_.barrier()  # every rank's files are complete before ``latest`` names the tag
        if rank == 0:
            _write_latest(save_dir, tag)
            if keep > 0:
                for old in [s for s in list_tags(save_dir) if s <= step][:-keep]:
                    shutil.rmtree(save_dir / self.tag(old), ignore_errors=True)
        dist_.barrier()
        return save_dir / tag

    def load_checkpoint(self, load_dir: str | Path, step: int | None = None, check=None) -> dict | None:
        """Collective. Restore engine, optimizer, target encoder and RNG from ``step`` (default:
        ``latest``); return the client state, or None when there is no checkpoint.

        A ZeRO checkpoint written by another number of ranks is converted to DeepSpeed's universal
        checkpoint first (rank 0, into ``load_dir/universal/<tag>``, deleted once every rank has
        loaded it; without ZeRO every rank's file holds everything). A rank the checkpoint has no
        file for takes the RNG state of rank ``rank % saved``.
        """
        load_dir = Path(load_dir)
        step = latest_step(load_dir) if step is None else step
        if step is None:
            return None
        tag_dir, rank, world = load_dir / self.tag(step), dist_.get_rank(), dist_.get_world_size()
        saved_world = saved_world_size(tag_dir)
        own = ckpt.load_file(tag_dir / _RANK_FILE.format(rank % saved_world), override=None)
        # Before the engine loads: DeepSpeed meets another stage's files with a bare assertion.
        _check_zero_stage(tag_dir, own.get("zero_stage"), self.zero_stage)
        if saved_world == world or self.zero_stage == 0:
            path, client = self.engine.load_checkpoint(
                str(load_dir), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=False
            )
            if path is None:
                raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag_dir.name} in {load_dir}")
            target_partitions = own.get("target_partitions")
        else:
            client, target_partitions = self._load_resharded(tag_dir, saved_world)
        _check_zero_stage(tag_dir, client.get("zero_stage"), self.zero_stage)
        if check is not None:
            check(client)
        with torch.no_grad():
            if self.zero_stage == 3:
                for t, saved in zip(self._shards()[0], target_partitions, strict=True):
                    t.copy_(saved)
            else:
                self.target_encoder.load_state_dict(client["target_encoder"])
        ckpt.set_rng_state(own["rng"])
        return client

    def _load_resharded(self, tag_dir: Path, saved_world: int) -> tuple[dict, list[torch.Tensor] | None]:
        """Collective: load ``tag_dir`` (written by ``saved_world`` ranks) through DeepSpeed's universal
        checkpoint; returns the client state and, at stage 3, this rank's target-encoder partitions."""
        universal = tag_dir.parent / _UNIVERSAL / tag_dir.name
        allowed = deepspeed_safe_globals()

        def convert() -> None:  # rank 0 writes, the others wait in the agreeing collective
            if dist_.get_rank() == 0 and not uc.is_converted(universal):
                convert_to_universal(tag_dir, universal, self.zero_stage)

        failed, error = dist_.failure_on_any_rank(convert, self.device)
        if failed:
            raise error or RuntimeError(f"another rank could not convert {tag_dir}; its log says why")
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        config = self.engine._config  # DeepSpeed reads the universal flag only while it loads a checkpoint
        config.load_universal_checkpoint = True
        try:
            with uc.weights_only_torch_load(allowed):
                path, client = self.engine.load_checkpoint(
                    str(universal.parent),
                    tag=universal.name,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=False,
                )
        finally:
            config.load_universal_checkpoint = False
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no universal checkpoint in {universal}")
        for group, settings in zip(self.optimizer.param_groups, groups, strict=True):
            # ZeRO-3's universal load gives every group the first group's settings (which groups
            # decay, above all); the schedules set lr and weight decay at the next step anyway.
            group.update(settings)
        _own_step_counts(self.optimizer.optimizer)
        partitions = self._target_partitions_from(universal) if self.zero_stage == 3 else None
        dist_.barrier()  # every rank has read the universal folder
        if dist_.get_rank() == 0:
            shutil.rmtree(universal.parent, ignore_errors=True)
        log.info("resumed %s, written by %d rank(s), on %d", tag_dir, saved_world, dist_.get_world_size())
        return client, partitions

    def _target_partitions_from(self, universal: Path) -> list[torch.Tensor]:
        """This rank's partition of each target-encoder parameter, from the joined flat parameters."""
        flat = ckpt.load_file(universal / uc.TARGET_FILE, override=None)
        rank = dist_.get_rank()
        return [
            uc.partition_of(f, p.ds_numel, rank, p.ds_tensor.numel())
            for f, p in zip(flat, self.target_encoder.parameters(), strict=True)
        ]

    # ------------------------------------------------------------------ export
    def _full_fp32(self, param: nn.Parameter) -> torch.Tensor:
        """Collective under ZeRO: the whole fp32 parameter (master weights when the engine has them)."""
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None and hasattr(param, "ds_id"):  # stage 3, no optimizer copy (frozen, or target)
            from deepspeed.runtime.zero import GatheredParameters

            with GatheredParameters([param], modifier_rank=None):
                full = param.detach().float().clone()
        elif full is None:
            full = param.detach()
        shape = param.ds_shape if hasattr(param, "ds_shape") else param.shape
        return full.reshape(shape).float().cpu().clone()

    def _module_fp32(self, module: nn.Module) -> dict[str, torch.Tensor]:
        out = {name: self._full_fp32(p) for name, p in module.named_parameters()}
        out.update({name: b.detach().cpu().clone() for name, b in module.named_buffers()})
        return out

    def consolidated_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Collective: fp32 ``encoder``, ``predictor`` and ``target_encoder`` state dicts (no
        ``module.`` prefix) on every rank."""
        return {
            "encoder": self._module_fp32(self.student.encoder),
            "predictor": self._module_fp32(self.student.predictor),
            "target_encoder": self._module_fp32(self.target_encoder),
        }

    def export_consolidated(
        self, ckpt_dir: str | Path, step: int, extra: dict | None = None, keep: int = 3
    ) -> Path | None:
        """Collective: rank 0 writes ``ckpt_dir/ckpt-XXXXXXXX.pt`` in ``ijepa_fast.io.checkpoint``'s
        format (read by ``ijepa-eval`` without DeepSpeed); returns its path there, None elsewhere.

        ``opt`` is empty: the optimizer state lives in the DeepSpeed checkpoint.
        """
        state = self.consolidated_state()
        if dist_.get_rank() != 0:
            return None
        state = {
            **(extra or {}),
            **state,
            "opt": {},
            "world_size": dist_.get_world_size(),
            "engine": "deepspeed",
            "zero_stage": self.zero_stage,
        }
        return ckpt.save_checkpoint(Path(ckpt_dir), state, step, keep)


# ----------------------------------------------------------------------------- checkpoint folder


def _check_zero_stage(tag_dir: Path, saved: int | None, stage: int) -> None:
    """A checkpoint resumes under the ZeRO stage that wrote it (``saved``; None: not recorded)."""
    if saved is not None and saved != stage:
        raise ValueError(
            f"--resume: {tag_dir} was written with run.zero_stage={saved}, this run has run.zero_stage={stage}: "
            f"resume with run.zero_stage={saved}"
        )


def _write_latest(save_dir: Path, tag: str) -> None:
    tmp = ckpt.temp_path(save_dir / "latest")
    tmp.write_text(tag)
    os.replace(tmp, save_dir / "latest")


def remove_partial_files_in(save_dir: str | Path) -> list[Path]:
    """Delete the temporary files that an interrupted save left in ``save_dir`` and in its tags.

    DeepSpeed writes its own files in place, without temporary files; a tag it did not finish is
    never named by ``latest`` (written last) and is overwritten when the run saves that step again.
    """
    save_dir = Path(save_dir)
    removed = ckpt.remove_partial_files(save_dir)
    for step in list_tags(save_dir):
        removed += ckpt.remove_partial_files(save_dir / DeepSpeedEngine.tag(step))
    return removed


def list_tags(save_dir: str | Path) -> list[int]:
    """Steps of the checkpoint tags in ``save_dir``, oldest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in save_dir.iterdir() if p.is_dir() and (m := _TAG.match(p.name)))


def latest_step(save_dir: str | Path) -> int | None:
    """The step of ``save_dir/latest`` (no engine needed: the trainer builds its loader from it)."""
    latest = Path(save_dir) / "latest"
    if not latest.is_file():
        return None
    m = _TAG.match(latest.read_text().strip())
    if m is None:
        raise ValueError(f"{latest} names {latest.read_text().strip()!r}, not a step_XXXXXXXX tag of this trainer")
    return int(m.group(1))


def convert_to_universal(tag_dir: Path, universal: Path, zero_stage: int) -> None:
    """Rewrite the checkpoint tag ``tag_dir`` as DeepSpeed's universal checkpoint in ``universal``
    (deleting what conversions of other tags left beside it); at stage 3 with the target encoder's
    partitions of every saved rank joined into whole parameters."""
    saved_world = saved_world_size(tag_dir)

    def target_partitions() -> list[list[torch.Tensor]]:
        files = [tag_dir / _RANK_FILE.format(r) for r in range(saved_world)]
        return [ckpt.load_file(f, override=None)["target_partitions"] for f in files]

    shutil.rmtree(universal.parent, ignore_errors=True)
    log.info("converting %s (%d ranks) to a universal checkpoint in %s", tag_dir, saved_world, universal)
    uc.convert(tag_dir, universal, deepspeed_safe_globals(), target_partitions if zero_stage == 3 else None)


def saved_world_size(tag_dir: str | Path) -> int:
    """The number of ranks that wrote the checkpoint tag ``tag_dir`` (one ``ijepa_rank*.pt`` each)."""
    tag_dir = Path(tag_dir)
    found = sorted(tag_dir.glob("ijepa_rank*.pt"))
    if not found or found != [tag_dir / _RANK_FILE.format(r) for r in range(len(found))]:
        raise ValueError(
            f"{tag_dir} does not hold one ijepa_rankNNNNN.pt per rank from 0 on ({len(found)} found): "
            f"the save that wrote it did not finish; resume from an earlier step_XXXXXXXX"
        )
    return len(found)


def _own_step_counts(optimizer: torch.optim.Optimizer) -> None:
    """ZeRO-3's universal load gives every parameter group one shared ``step`` tensor, which AdamW
    then advances once per group at each step (wrong bias corrections): each group gets its own."""
    seen: set[int] = set()
    for state in optimizer.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(step))
