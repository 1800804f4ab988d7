"""DeepSpeed ZeRO engine for I-JEPA: config generation, the training step, ZeRO-aware EMA, checkpoints.

The student (context encoder + predictor, ``JEPAStudent``) trains inside ``deepspeed.initialize``
with ZeRO stage 0-3; our schedules set the learning rate and weight decay of each AdamW group every
step (weight decay only on groups whose ``wd_exclude`` is False). The target encoder:

- stages 0-2: a full replica on every rank, EMA over full parameters (``ijepa_fast.kernels.ema`` fused kernel);
  every rank applies the same update to the same (all-gathered) student weights, so replicas agree.
- stage 3: partitioned exactly like the student by a second engine without optimizer. A parameter's
  partition depends only on its size and the world size, so ``target.ds_tensor`` and
  ``student.encoder.ds_tensor`` hold the same slice: the EMA runs shard by shard on the local
  partitions, with no collective. Only the target's forward gathers (layer by layer, as ZeRO-3
  does for any module). Its persistence thresholds are 0 so no gathered copy outlives a forward
  and goes stale after the EMA writes the partitions.

Precision: ``run.dtype`` bf16 -> with ZeRO, DeepSpeed ``bf16`` (bf16 weights, fp32 master weights
and AdamW state in the optimizer); without ZeRO (stage 0), fp32 weights under ``torch_autocast``
(see ``_owned``). The target encoder stays fp32 (an EMA with momentum 0.9999 vanishes in bf16) and
runs its forward under bf16 autocast. fp32 (the CPU default) -> no mixed precision.

Checkpoints (``save_checkpoint`` / ``load_checkpoint``) go through the engine, plus one small file
per rank with what differs per rank (RNG, stage-3 target partitions); ``latest`` is written last,
atomically, after every rank has finished. ``export_consolidated`` writes a plain fp32 checkpoint
in ``ijepa_fast.checkpoint``'s format (encoder / predictor / target_encoder state dicts) that
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ijepa_fast import checkpoint as ckpt
from ijepa_fast import distributed as dist_
from ijepa_fast.config import Config, ConfigError
from ijepa_fast.masks import MaskBatch
from ijepa_fast.models.ijepa import JEPAStudent, compute_targets
from ijepa_fast.optional import require
from ijepa_fast.schedules import Schedules
from ijepa_fast.step import StepOptions, all_finite, autocast_dtype, ema_update, param_groups, set_lr_wd

log = logging.getLogger(__name__)

_TAG = re.compile(r"^step_(\d{8,})$")
_RANK_FILE = "ijepa_rank{:05d}.pt"
_QUIET_STEPS = 2**31 - 1  # DeepSpeed's own progress print; the trainer logs


# ----------------------------------------------------------------------------- config


def _owned(cfg: Config, world_size: int, grad_accum: int, bf16: bool) -> list[tuple[str, Any, str]]:
    """(DeepSpeed key, our value, where it comes from) for every value our config decides.

    bf16 with ZeRO: DeepSpeed's ``bf16`` (bf16 weights, fp32 master copy in the optimizer). Stage 0
    has no fp32 master path for bf16 weights (DeepSpeed refuses fp32 gradient accumulation there;
    its bf16-gradient path left the fp32 losses after one step on the tiny test model: 0.4254 vs
    0.4184, where stages 1-3 stayed within 3e-4), so stage 0 keeps fp32 weights and gradients and
    runs the forward under ``torch_autocast``, as the plain trainer does.
    """
    o = cfg.optim
    bf16_weights = bf16 and cfg.run.zero_stage > 0
    return [
        ("train_micro_batch_size_per_gpu", cfg.data.batch_size, f"data.batch_size={cfg.data.batch_size}"),
        ("gradient_accumulation_steps", grad_accum, f"gradient accumulation={grad_accum}"),
        (
            "train_batch_size",
            cfg.data.batch_size * world_size * grad_accum,
            f"data.batch_size={cfg.data.batch_size} x {world_size} ranks x {grad_accum} accumulation",
        ),
        ("zero_optimization.stage", cfg.run.zero_stage, f"run.zero_stage={cfg.run.zero_stage}"),
        ("bf16.enabled", bf16_weights, f"run.dtype={cfg.run.dtype} and run.zero_stage={cfg.run.zero_stage}"),
        (
            "torch_autocast.enabled",
            bf16 and not bf16_weights,
            f"run.dtype={cfg.run.dtype} and run.zero_stage={cfg.run.zero_stage}",
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
    ``train_batch_size`` = micro x world x accumulation, ``zero_optimization.stage``, ``bf16``,
    ``gradient_clipping`` and an AdamW optimizer (``torch_adam`` off CUDA: no JIT build).
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
    bf16 = autocast_dtype(torch.device(device_type), cfg.run.dtype) == torch.bfloat16
    owned = _owned(cfg, world_size, grad_accum, bf16)
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
        "optimizer": {"type": "AdamW", "params": {"torch_adam": device_type != "cuda"}},
    }
    for key, value, _ in owned:
        _set(ours, key, value)
    if _get(ours, "torch_autocast.enabled"):  # stage 0 bf16: gradients reduced in fp32 too
        ours["torch_autocast"].update(dtype="bfloat16", lower_precision_safe_modules=[])
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


# ----------------------------------------------------------------------------- the step


class DeepSpeedTrainStep:
    """The training step of ``step.TrainStep`` run by a DeepSpeed engine (same call interface).

    ``step(images [B,3,S,S], masks: MaskBatch, step: int) -> {"loss": 0-d tensor}`` with B the
    per-rank micro batch and masks this rank's rows; ``loss`` is the mean over ranks (every rank
    sees the same value, so a non-finite loss stops all of them at the same step). With gradient
    accumulation, call it once per micro batch with the same optimizer ``step``: the weights and
    the EMA move on the last one (``stepped`` tells which).
    """

    def __init__(
        self,
        student: JEPAStudent,
        target_encoder: nn.Module,
        schedules: Schedules,
        ds_config: dict,
        device: torch.device,
        options: StepOptions | None = None,
    ):
        ds = require("deepspeed", "run.engine=deepspeed")
        self.ds_config = ds_config
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))  # bf16 weights in the engine
        autocast = bool(ds_config.get("torch_autocast", {}).get("enabled", False))
        self.schedules, self.device = schedules, device
        self.options = options or StepOptions()
        self.amp_dtype = torch.bfloat16 if self.bf16 or autocast else None  # the target encoder's forward
        self.engine, self.optimizer, _, _ = ds.initialize(
            model=student, model_parameters=param_groups(student), config=ds_config
        )
        self.student: JEPAStudent = self.engine.module
        if self.zero_stage == 3:
            self.target_engine = ds.initialize(model=target_encoder, config=target_config(ds_config))[0]
            self.target_encoder = self.target_engine.module
            self._target_forward = self.target_engine
            self._check_partitions()
        else:
            self.target_engine = None
            self.target_encoder = target_encoder.to(device)
            self._target_forward = self.target_encoder
        self.stepped = False
        total, micro, ranks, accum = global_batch(ds_config)
        precision = "bf16 weights" if self.bf16 else "fp32, bf16 autocast" if autocast else "fp32"
        log.info(
            "DeepSpeed ZeRO stage %d, %s: global batch %d = %d per rank x %d ranks x %d accumulation",
            self.zero_stage,
            precision,
            total,
            micro,
            ranks,
            accum,
        )

    # ------------------------------------------------------------------ step
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def __call__(self, images: torch.Tensor, masks: MaskBatch, step: int) -> dict[str, torch.Tensor]:
        set_lr_wd(self.optimizer, self.schedules.lr_at(step), self.schedules.wd_at(step))
        with self._autocast():
            targets = compute_targets(self._target_forward, images, masks, fused=self.options.fused_gather)
        if self.bf16:  # the engine's weights are bf16; it does not cast inputs
            images = images.to(torch.bfloat16)
        loss = self.engine(images, masks.context, masks.targets, targets)
        self.engine.backward(loss)
        self.stepped = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if self.stepped:
            self.ema_update(self.schedules.momentum_at(step))
        return {"loss": dist_.all_mean_(loss.detach().float().clone())}

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

    @torch.no_grad()
    def ema_update(self, momentum: float) -> None:
        """target <- m * target + (1 - m) * encoder. Stage 3: on this rank's partitions only."""
        if self.zero_stage < 3:
            ema_update(self.target_encoder, self.student.encoder, momentum, fused=self.options.fused_ema)
            return
        targets, sources = self._shards()
        if self.options.fused_ema:
            from ijepa_fast.kernels.ema import ema_update_

            ema_update_(targets, sources, momentum)
        else:
            for t, s in zip(targets, sources):
                t.mul_(momentum).add_((1.0 - momentum) * s.float())

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
        own: dict[str, Any] = {"step": step, "rank": rank, "world_size": world, "rng": ckpt.rng_state()}
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

    def load_checkpoint(self, load_dir: str | Path, step: int | None = None) -> dict | None:
        """Collective. Restore engine, optimizer, target encoder and RNG from ``step`` (default:
        ``latest``); return the client state, or None when there is no checkpoint."""
        load_dir = Path(load_dir)
        step = latest_step(load_dir) if step is None else step
        if step is None:
            return None
        tag, rank, world = self.tag(step), dist_.get_rank(), dist_.get_world_size()
        own_path = load_dir / tag / _RANK_FILE.format(rank)
        if not own_path.is_file():
            saved = len(list((load_dir / tag).glob("ijepa_rank*.pt")))
            raise ValueError(
                f"{load_dir / tag} was written by {saved} rank(s) and holds no file for rank {rank} of "
                f"{world}: resume on the same world size"
            )
        own = torch.load(own_path, map_location="cpu", weights_only=True)
        if own["world_size"] != world:
            raise ValueError(
                f"{load_dir / tag} was written by {own['world_size']} ranks, this run has {world}: "
                f"resume on the same world size"
            )
        path, client = self.engine.load_checkpoint(
            str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag} in {load_dir}")
        if client.get("zero_stage") != self.zero_stage:
            raise ValueError(
                f"{load_dir / tag} was written with ZeRO stage {client.get('zero_stage')}, this run uses "
                f"{self.zero_stage}"
            )
        with torch.no_grad():
            if self.zero_stage == 3:
                for t, saved in zip(self._shards()[0], own["target_partitions"], strict=True):
                    t.copy_(saved)
            else:
                self.target_encoder.load_state_dict(client["target_encoder"])
        ckpt.set_rng_state(own["rng"])
        return client

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
        """Collective: rank 0 writes ``ckpt_dir/ckpt-XXXXXXXX.pt`` in ``ijepa_fast.checkpoint``'s
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


def _write_latest(save_dir: Path, tag: str) -> None:
    tmp = ckpt.temp_path(save_dir / "latest")
    tmp.write_text(tag)
    os.replace(tmp, save_dir / "latest")


def remove_partial_files(save_dir: str | Path) -> list[Path]:
    """Delete the temporary files that an interrupted save left in ``save_dir`` and in its tags.

    DeepSpeed writes its own files in place, without temporary files; a tag it did not finish is
    never named by ``latest`` (written last) and is overwritten when the run saves that step again.
    """
    save_dir = Path(save_dir)
    removed = ckpt.remove_partial_files(save_dir)
    for step in list_tags(save_dir):
        removed += ckpt.remove_partial_files(save_dir / DeepSpeedTrainStep.tag(step))
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
