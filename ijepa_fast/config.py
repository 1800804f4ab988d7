"""Typed run configuration: dataclasses validated at load, errors that name the bad key.

A config is five sections (model, mask, data, optim, run) plus ``speed`` (the optimisation
switches). It loads from our own YAML/dict form, from the authors' YAML files (sections data,
logging, mask, meta, optimization; see ``ijepa_fast.authors_config``), and takes ``key=value``
overrides such as ``optim.lr=5e-4``. The resolved config is written into every run folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

MODEL_NAMES = ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant")


class ConfigError(ValueError):
    """A config key is unknown or a value is invalid; the message names the key."""


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {allowed}")


def _check_range(key: str, pair: tuple[float, float], lo: float, hi: float, lo_open: bool = True) -> None:
    a, b = pair
    lo_ok = (a > lo) if lo_open else (a >= lo)
    relation = "<" if lo_open else "<="
    _check(lo_ok and b <= hi and a <= b, key, pair, f"a pair (lo, hi) with {lo} {relation} lo <= hi <= {hi}")


@dataclass
class ModelConfig:
    name: str = "vit_huge"
    patch_size: int = 14
    pred_depth: int = 12
    pred_emb_dim: int = 384
    init_std: float = 0.02

    def validate(self, prefix: str = "model") -> None:
        _check(self.name in MODEL_NAMES, f"{prefix}.name", self.name, f"one of {MODEL_NAMES}")
        _check(self.patch_size >= 1, f"{prefix}.patch_size", self.patch_size, "a positive integer (14 or 16 usually)")
        _check(self.pred_depth >= 1, f"{prefix}.pred_depth", self.pred_depth, "an integer >= 1")
        _check(self.pred_emb_dim >= 1, f"{prefix}.pred_emb_dim", self.pred_emb_dim, "an integer >= 1")
        _check(self.init_std > 0, f"{prefix}.init_std", self.init_std, "a positive float")


@dataclass
class MaskConfig:
    num_pred_masks: int = 4
    num_enc_masks: int = 1
    pred_mask_scale: tuple[float, float] = (0.15, 0.2)
    enc_mask_scale: tuple[float, float] = (0.85, 1.0)
    aspect_ratio: tuple[float, float] = (0.75, 1.5)
    min_keep: int = 10
    allow_overlap: bool = False

    def validate(self, prefix: str = "mask") -> None:
        _check(self.num_pred_masks >= 1, f"{prefix}.num_pred_masks", self.num_pred_masks, "an integer >= 1")
        # The authors' configs all use one context block; several would only repeat the targets.
        _check(
            self.num_enc_masks == 1, f"{prefix}.num_enc_masks", self.num_enc_masks, "1 (the only value the method uses)"
        )
        _check_range(f"{prefix}.pred_mask_scale", self.pred_mask_scale, 0.0, 1.0)
        _check_range(f"{prefix}.enc_mask_scale", self.enc_mask_scale, 0.0, 1.0)
        _check_range(f"{prefix}.aspect_ratio", self.aspect_ratio, 0.0, math.inf)
        _check(self.min_keep >= 1, f"{prefix}.min_keep", self.min_keep, "an integer >= 1")


@dataclass
class DataConfig:
    dataset: str = "folder"  # folder: ImageNet-style tree; idx: MNIST/Fashion-MNIST IDX files
    root: str = ""
    split: str = "train"  # idx: train|test; folder: a sub-folder name, or "" for the root itself
    crop_size: int = 224
    crop_scale: tuple[float, float] = (0.3, 1.0)
    batch_size: int = 128  # per rank
    num_workers: int = 8
    pin_memory: bool = True
    loader: str = "auto"  # auto|pytorch|dali
    limit: int = 0  # use only the first N images (0: all)

    def validate(self, prefix: str = "data") -> None:
        _check(self.dataset in ("folder", "idx"), f"{prefix}.dataset", self.dataset, "'folder' or 'idx'")
        _check(self.crop_size >= 1, f"{prefix}.crop_size", self.crop_size, "a positive integer")
        _check_range(f"{prefix}.crop_scale", self.crop_scale, 0.0, 1.0)
        _check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "an integer >= 1")
        _check(self.num_workers >= 0, f"{prefix}.num_workers", self.num_workers, "an integer >= 0")
        _check(self.loader in ("auto", "pytorch", "dali"), f"{prefix}.loader", self.loader, "auto, pytorch or dali")
        _check(self.limit >= 0, f"{prefix}.limit", self.limit, "an integer >= 0")


@dataclass
class OptimConfig:
    epochs: int = 300
    max_steps: int = 0  # stop after this many steps (0: run all epochs); schedules still span `epochs`
    ipe_scale: float = 1.0  # schedules span epochs * iterations-per-epoch * ipe_scale steps (authors)
    warmup_epochs: float = 40.0
    start_lr: float = 2e-4
    lr: float = 1e-3
    final_lr: float = 1e-6
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    ema: tuple[float, float] = (0.996, 1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 0.0  # 0: off (the authors do not clip)
    # Micro-batches per optimizer step: the global batch is data.batch_size x ranks x grad_accum, and
    # a "step" (schedules, max_steps, checkpoints, logs) is one optimizer step.
    grad_accum: int = 1
    loss: str = "smooth_l1"  # smooth_l1 (authors' code) | l2 (paper's text)

    def validate(self, prefix: str = "optim") -> None:
        _check(self.epochs >= 1, f"{prefix}.epochs", self.epochs, "an integer >= 1")
        _check(self.max_steps >= 0, f"{prefix}.max_steps", self.max_steps, "an integer >= 0")
        _check(self.grad_accum >= 1, f"{prefix}.grad_accum", self.grad_accum, "an integer >= 1")
        _check(self.ipe_scale > 0, f"{prefix}.ipe_scale", self.ipe_scale, "a positive float")
        _check(
            0 <= self.warmup_epochs <= self.epochs,
            f"{prefix}.warmup_epochs",
            self.warmup_epochs,
            f"a float in [0, epochs={self.epochs}]",
        )
        for k in ("start_lr", "lr", "final_lr", "weight_decay", "final_weight_decay", "grad_clip"):
            _check(getattr(self, k) >= 0, f"{prefix}.{k}", getattr(self, k), "a float >= 0")
        _check(self.lr > 0, f"{prefix}.lr", self.lr, "a float > 0")
        _check_range(f"{prefix}.ema", self.ema, 0.0, 1.0, lo_open=False)
        _check(all(0 <= b < 1 for b in self.betas), f"{prefix}.betas", self.betas, "two floats in [0, 1)")
        _check(self.eps > 0, f"{prefix}.eps", self.eps, "a positive float")
        _check(self.loss in ("smooth_l1", "l2"), f"{prefix}.loss", self.loss, "smooth_l1 or l2")


@dataclass
class SpeedConfig:
    """Every optimisation is a switch, so the profiler can measure what each buys.

    ``preset: authors`` turns all of them to the authors' side (see ``apply_preset``).
    """

    preset: str = "fast"  # fast|authors: applied first, explicit keys win
    attention: str = "auto"  # auto|sdpa|flash_attn|xformers|math
    compile: str = "auto"  # auto (on for CUDA, off for CPU)|on|off
    fused_ema: bool = True  # False: the authors' per-parameter mul_/add_ loop
    fused_gather: bool = True  # False: the authors' expand + gather + cat masks
    fused_optimizer: bool = True  # AdamW fused on CUDA, foreach on CPU; False: for-loop AdamW
    grad_scaler: bool = False  # True: a GradScaler as the authors (not needed for bf16)
    sync_every_step: bool = False  # True: read loss and grad norms to the host every step (authors)
    activation_checkpointing: bool = False

    def validate(self, prefix: str = "speed") -> None:
        _check(self.preset in ("fast", "authors"), f"{prefix}.preset", self.preset, "fast or authors")
        _check(
            self.attention in ("auto", "sdpa", "flash_attn", "xformers", "math"),
            f"{prefix}.attention",
            self.attention,
            "auto, sdpa, flash_attn, xformers or math",
        )
        _check(self.compile in ("auto", "on", "off"), f"{prefix}.compile", self.compile, "auto, on or off")


AUTHORS_SPEED = dict(
    attention="math",
    compile="off",
    fused_ema=False,
    fused_gather=False,
    fused_optimizer=False,
    grad_scaler=True,
    sync_every_step=True,
)


@dataclass
class RunConfig:
    out_dir: str = "runs"
    name: str = "ijepa"
    seed: int = 0
    device: str = "auto"  # auto|cpu|cuda|cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU)|bf16|fp32
    log_every: int = 10  # one host sync every log_every steps
    checkpoint_every: int = 1000  # steps; a checkpoint is also written at the end
    keep_checkpoints: int = 3
    engine: str = "auto"  # auto (deepspeed under a multi-process launcher, else plain)|plain|deepspeed
    zero_stage: int = 1
    ds_config: str = ""  # a DeepSpeed JSON whose values override the generated ones
    dist_timeout_s: float = 0.0  # a dead or stalled rank fails the others after this; 0: $IJEPA_DIST_TIMEOUT_S or 1800
    progress: bool = True
    tensorboard: bool = True

    def validate(self, prefix: str = "run") -> None:
        _check(bool(self.name), f"{prefix}.name", self.name, "a non-empty string")
        _check(self.dtype in ("auto", "bf16", "fp32"), f"{prefix}.dtype", self.dtype, "auto, bf16 or fp32")
        _check(self.log_every >= 1, f"{prefix}.log_every", self.log_every, "an integer >= 1")
        _check(self.checkpoint_every >= 1, f"{prefix}.checkpoint_every", self.checkpoint_every, "an integer >= 1")
        _check(self.keep_checkpoints >= 1, f"{prefix}.keep_checkpoints", self.keep_checkpoints, "an integer >= 1")
        _check(
            self.engine in ("auto", "plain", "deepspeed"), f"{prefix}.engine", self.engine, "auto, plain or deepspeed"
        )
        _check(self.dist_timeout_s >= 0, f"{prefix}.dist_timeout_s", self.dist_timeout_s, "seconds >= 0")
        _check(self.zero_stage in (0, 1, 2, 3), f"{prefix}.zero_stage", self.zero_stage, "0, 1, 2 or 3")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> Config:
        self._check_finite()
        for f in fields(self):
            getattr(self, f.name).validate(f.name)
        _check(
            self.data.crop_size % self.model.patch_size == 0,
            "data.crop_size",
            self.data.crop_size,
            f"a multiple of model.patch_size={self.model.patch_size}",
        )
        return self

    def _check_finite(self) -> None:
        """inf and nan pass most range checks (inf > 0) and then train to garbage: no float may be one."""
        for key, value in flatten(self).items():
            numbers = value if isinstance(value, tuple) else (value,)
            finite = all(math.isfinite(x) for x in numbers if isinstance(x, float))
            _check(
                finite, key, value, "finite numbers (no inf or nan)" if isinstance(value, tuple) else "a finite number"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"section.key": value}`` over every field of every section."""
    return {f"{section}.{key}": value for section, values in cfg.to_dict().items() for key, value in values.items()}


# Keys a resumed run may change without --allow-config-change: they decide how long the run goes,
# where its folder lies (moved or copied) and what it reports or keeps, not what a step computes.
RESUME_MAY_CHANGE = (
    "optim.max_steps",
    "run.out_dir",
    "run.name",
    "run.log_every",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.progress",
    "run.tensorboard",
)


def differences(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """``{"section.key": (old value, new value)}`` for every key whose value differs."""
    before, after = flatten(old), flatten(new)
    return {key: (before[key], after[key]) for key in after if before[key] != after[key]}


# ----------------------------------------------------------------------------- loading


def _nearest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(options))}"


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the field's declared type."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(annotation)):
            raise ConfigError(f"{key}={value!r} is invalid: expected a pair like [a, b]")
        return tuple(_coerce(key, v, a) for v, a in zip(value, typing.get_args(annotation)))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: unsupported field type {annotation}")
    if annotation is bool:
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} is invalid: expected true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is invalid: expected an integer")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is invalid: expected an integer") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}={value!r} is invalid: expected an integer")
        return int(as_float)
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is invalid: expected a number") from None
    if annotation is str:
        return "" if value is None else str(value)
    raise ConfigError(f"{key}: unsupported field type {annotation}")


def _section_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """Build a validated Config from ``{section: {key: value}}``; unknown keys are errors."""
    cfg = _deep_copy(base) if base is not None else Config()
    sections = {f.name: f for f in fields(Config)}
    for section, values in (data or {}).items():
        if section not in sections:
            raise ConfigError(f"unknown config section '{section}'{_nearest(section, list(sections))}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping, got {type(values).__name__}")
        _apply_section(cfg, section, values)
    return cfg.validate()


def _apply_section(cfg: Config, section: str, values: dict[str, Any]) -> None:
    obj = getattr(cfg, section)
    types_ = _section_types(type(obj))
    if section == "speed" and values.get("preset") == "authors":
        for k, v in AUTHORS_SPEED.items():
            setattr(obj, k, v)
    for key, value in values.items():
        if key not in types_:
            raise ConfigError(f"unknown config key '{section}.{key}'{_nearest(key, list(types_))}")
        setattr(obj, key, _coerce(f"{section}.{key}", value, types_[key]))


def _deep_copy(cfg: Config) -> Config:
    return Config(**{f.name: dataclasses.replace(getattr(cfg, f.name)) for f in fields(Config)})


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (from the command line) and re-validate."""
    nested: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, value = item.split("=", 1)
        if "." not in dotted:
            raise ConfigError(f"override {item!r}: the key must name its section, e.g. optim.lr=1e-3")
        section, key = dotted.split(".", 1)
        nested.setdefault(section, {})[key] = value
    return from_dict(nested, base=cfg)


def load(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (ours, or the authors' format, detected by its sections) plus overrides."""
    import yaml

    cfg = Config()
    if path:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of sections")
        from ijepa_fast.authors_config import is_authors_format, translate

        cfg = from_dict(translate(raw) if is_authors_format(raw) else raw)
    return apply_overrides(cfg, overrides or []).validate()


def save(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (our format), loadable with ``load``."""
    import yaml

    data = {
        section: {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        for section, values in cfg.to_dict().items()
    }
    with open(path, "w") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)
