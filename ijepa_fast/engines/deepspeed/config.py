"""The DeepSpeed config of a run: generated from ours, merged with the user's ``run.ds_config``
(a key both give must agree), and the stage-3 target encoder's config derived from it."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ijepa_fast.runtime.errors import ConfigError
from ijepa_fast.train.optim import adamw_implementation

if TYPE_CHECKING:
    from ijepa_fast.config import Config

_QUIET_STEPS = 2**31 - 1  # DeepSpeed's own progress print; the trainer logs
# DeepSpeed's fp16 mode keeps fp16 weights (fp32 master copies inside its optimizer), so the EMA
# would average fp16 weights: not the step this engine computes. bf16 or fp32 instead.
FP16_REFUSED = "run.dtype=fp16 is not supported by the DeepSpeed engine: use run.dtype=bf16 or fp32"


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
    if cfg.run.dtype == "fp16":  # run.engine=auto under a launcher: the schema could not know
        raise ConfigError(FP16_REFUSED)
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
