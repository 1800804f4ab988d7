"""The config's sections as typed dataclasses, each validated by its ``validate`` with errors that name
the bad key; the comment beside a field is its documentation (``parse.describe`` prints them)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ijepa_fast.config.choices import (
    ATTENTION_BACKENDS,
    COMPILE_MODES,
    DATASETS,
    DTYPES,
    ENGINES,
    FP8_RECIPES,
    IMAGE_CHECKS,
    LOADERS,
    LOSSES,
    MODEL_NAMES,
    PRESETS,
    PROBE_DATASETS,
    PROBE_UNITS,
    WANDB_MODES,
    ZERO_STAGES,
)
from ijepa_fast.config.options import check, check_choice, check_device, check_range
from ijepa_fast.runtime.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "vit_huge"  # encoder size: vit_tiny|vit_small|vit_base|vit_large|vit_huge|vit_giant
    depth: int = 0  # encoder blocks; 0: the named size's (12 for vit_tiny ... vit_base)
    patch_size: int = 14  # pixels per patch side (14 or 16 in the paper)
    pred_depth: int = 12  # predictor blocks (6 for ViT-B, 12 for ViT-L/H, 16 for ViT-G)
    pred_emb_dim: int = 384  # predictor width
    init_std: float = 0.02  # truncated-normal std of the initial weights
    # True: each block's output projections divided by sqrt(2 * layer) at init, as the authors' model
    # classes do; their training re-initialises every Linear after building (init_model), undoing it
    depth_scaled_init: bool = False

    def validate(self, prefix: str = "model") -> None:
        check_choice(f"{prefix}.name", self.name, MODEL_NAMES)
        check(self.depth >= 0, f"{prefix}.depth", self.depth, "an integer >= 0 (0: the named size's depth)")
        check(self.patch_size >= 1, f"{prefix}.patch_size", self.patch_size, "a positive integer (14 or 16 usually)")
        check(self.pred_depth >= 1, f"{prefix}.pred_depth", self.pred_depth, "an integer >= 1")
        check(self.pred_emb_dim >= 1, f"{prefix}.pred_emb_dim", self.pred_emb_dim, "an integer >= 1")
        check(self.init_std > 0, f"{prefix}.init_std", self.init_std, "a positive float")


@dataclass
class MaskConfig:
    """The multi-block mask sampler's arguments, under its own names (``masks.MultiBlockMaskSampler``)."""

    num_pred_masks: int = 4  # target blocks per image
    pred_scale: tuple[float, float] = (0.15, 0.2)  # share of the grid each target block covers
    enc_scale: tuple[float, float] = (0.85, 1.0)  # share of the grid the context block covers
    aspect_ratio: tuple[float, float] = (0.75, 1.5)  # target blocks' height / width
    # fewest context patches an image keeps; the authors' min_keep keeps more than it (len > min_keep),
    # so their files read as min_keep + 1 (config.authors)
    min_keep: int = 10
    allow_overlap: bool = False  # true: contexts keep the patches of the targets

    def validate(self, prefix: str = "mask") -> None:
        check(self.num_pred_masks >= 1, f"{prefix}.num_pred_masks", self.num_pred_masks, "an integer >= 1")
        check_range(f"{prefix}.pred_scale", self.pred_scale, 0.0, 1.0)
        check_range(f"{prefix}.enc_scale", self.enc_scale, 0.0, 1.0)
        check_range(f"{prefix}.aspect_ratio", self.aspect_ratio, 0.0, math.inf)
        check(self.min_keep >= 1, f"{prefix}.min_keep", self.min_keep, "an integer >= 1")


@dataclass
class DataConfig:
    dataset: str = "folder"  # folder: ImageNet-style tree or webdataset tars; idx: MNIST/Fashion-MNIST IDX files
    root: str = ""  # the data folder
    split: str = "train"  # idx: train|test; folder: a sub-folder name, or "" for the root itself
    crop_size: int = 224  # RandomResizedCrop output, pixels
    crop_scale: tuple[float, float] = (0.3, 1.0)  # RandomResizedCrop area range
    batch_size: int = 128  # per rank, per micro-batch
    num_workers: int = 8  # loader worker processes (DALI: threads)
    pin_memory: bool = True  # page-locked host batches for faster copies to the GPU
    loader: str = "auto"  # auto (DALI on a GPU when installed)|pytorch|dali
    limit: int = 0  # use only the first N images (0: all)
    # true: the authors' pixels exactly (full decode, Pillow's resample; slower); false: reduced-scale
    # JPEG decoding and torch's resample where faster, under 1.5 of 255 apart on average (data.decode)
    exact_pixels: bool = False
    # DALI's image check before step 0 (data.dali.validate): header (cheap; what DALI then fails on
    # is excluded at run time) | full (decode every image) | off
    image_check: str = "header"
    # the folder of the check's per-dataset verdict cache: "" the user cache (IJEPA_CACHE_DIR, else
    # XDG_CACHE_HOME/ijepa_fast, else ~/.cache/ijepa_fast), "off" none, else a folder
    image_check_cache: str = ""

    def validate(self, prefix: str = "data") -> None:
        check_choice(f"{prefix}.dataset", self.dataset, DATASETS)
        check(self.crop_size >= 1, f"{prefix}.crop_size", self.crop_size, "a positive integer")
        check_range(f"{prefix}.crop_scale", self.crop_scale, 0.0, 1.0)
        check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "an integer >= 1")
        check(self.num_workers >= 0, f"{prefix}.num_workers", self.num_workers, "an integer >= 0")
        check_choice(f"{prefix}.loader", self.loader, LOADERS)
        check(self.limit >= 0, f"{prefix}.limit", self.limit, "an integer >= 0")
        check_choice(f"{prefix}.image_check", self.image_check, IMAGE_CHECKS)
        check(
            isinstance(self.image_check_cache, str) and "\n" not in self.image_check_cache,
            f"{prefix}.image_check_cache",
            self.image_check_cache,
            'a folder, "" (the user cache) or "off"',
        )


@dataclass
class OptimConfig:
    epochs: int = 300  # length of the schedules
    max_steps: int = 0  # stop after this many steps (0: run all epochs); schedules still span `epochs`
    ipe_scale: float = 1.0  # schedules span epochs * iterations-per-epoch * ipe_scale steps (authors)
    warmup_epochs: float = 40.0  # linear lr warm-up from start_lr to lr
    start_lr: float = 2e-4  # lr at step 0
    lr: float = 1e-3  # peak lr, after warm-up
    final_lr: float = 1e-6  # lr at the end of the cosine
    weight_decay: float = 0.04  # weight decay at step 0 (cosine to final_weight_decay)
    final_weight_decay: float = 0.4  # weight decay at the end
    ema: tuple[float, float] = (0.996, 1.0)  # target-encoder momentum, linear from first to second
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 0.0  # max gradient norm; 0: off (the authors do not clip)
    # Micro-batches per optimizer step: the global batch is data.batch_size x ranks x grad_accum, and
    # a "step" (schedules, max_steps, checkpoints, logs) is one optimizer step.
    grad_accum: int = 1
    loss: str = "smooth_l1"  # smooth_l1 (authors' code) | l2 (paper's text)

    def validate(self, prefix: str = "optim") -> None:
        check(self.epochs >= 1, f"{prefix}.epochs", self.epochs, "an integer >= 1")
        check(self.max_steps >= 0, f"{prefix}.max_steps", self.max_steps, "an integer >= 0")
        check(self.grad_accum >= 1, f"{prefix}.grad_accum", self.grad_accum, "an integer >= 1")
        check(self.ipe_scale > 0, f"{prefix}.ipe_scale", self.ipe_scale, "a positive float")
        check(
            0 <= self.warmup_epochs <= self.epochs,
            f"{prefix}.warmup_epochs",
            self.warmup_epochs,
            f"a float in [0, epochs={self.epochs}]",
        )
        for k in ("start_lr", "lr", "final_lr", "weight_decay", "final_weight_decay", "grad_clip"):
            check(getattr(self, k) >= 0, f"{prefix}.{k}", getattr(self, k), "a float >= 0")
        check(self.lr > 0, f"{prefix}.lr", self.lr, "a float > 0")
        check_range(f"{prefix}.ema", self.ema, 0.0, 1.0, lo_open=False)
        check(all(0 <= b < 1 for b in self.betas), f"{prefix}.betas", self.betas, "two floats in [0, 1)")
        check(self.eps > 0, f"{prefix}.eps", self.eps, "a positive float")
        check_choice(f"{prefix}.loss", self.loss, LOSSES)


@dataclass
class SpeedConfig:
    """Every optimisation is a switch, so the profiler can measure what each buys.

    ``preset: authors`` turns all of them to the authors' side (``AUTHORS_SPEED``).
    """

    preset: str = "fast"  # fast|authors: applied first, explicit keys win
    attention: str = "auto"  # auto|sdpa|flash_attn|xformers|math (math: the authors' explicit softmax)
    compile: str = "auto"  # auto (on for CUDA, off for CPU)|on|off: torch.compile of each block
    fused_ema: bool = True  # False: the authors' per-parameter mul_/add_ loop
    fused_gather: bool = True  # False: the authors' expand + gather + cat masks
    fused_optimizer: bool = (
        True  # AdamW fused (CUDA and CPU: skips non-finite steps on the device); False: torch's default, as the authors
    )
    grad_scaler: bool = False  # True: a GradScaler as the authors (not needed for bf16)
    sync_every_step: bool = False  # True: the authors' per-step host syncs (gradient norms, loss, synchronize)
    activation_checkpointing: bool = False  # recompute each block in backward (less memory, more time)
    # A bf16 copy of the target encoder's matmul weights (Linear and Conv2d weights and biases),
    # written by the fused EMA in the same pass, read by the target forward instead of casting the
    # fp32 weights at every forward. Exact: its bits are autocast's cast of the fp32 EMA weights,
    # which stay the source of truth and alone go into checkpoints. Needs bf16 autocast to act, and
    # the whole target encoder on each rank: ZeRO-3 and FSDP2, which shard it, run without the copy.
    # False: the target casts under autocast.
    bf16_target_copy: bool = True
    # Under bf16 autocast, keep the residual stream in bf16: the fixed position embeddings and the
    # predictor's mask token are cast to bf16 before they join it (fp32 ones promote the stream to
    # fp32, as in the authors' code), LayerNorms take and return bf16 (fp32 statistics and affine),
    # and the residual adds round to bf16. A change of function: the stream, the encoder outputs and
    # so the targets are rounded to bf16 (8 significant bits) where the authors keep fp32. Measured
    # against the fp32 stream in profiling/RESULTS.md: targets, loss and gradients of one step, and
    # a learning check (probe, kNN, RankMe over seeds) that found no loss beyond the seed-to-seed
    # spread, hence on by default. fp32 runs (no autocast) are unchanged; features for evaluation
    # (ijepa-eval, the demo's probe) are taken with the fp32 stream. False: the authors' fp32 stream.
    bf16_residual: bool = True
    # The loader hands uint8 images; they are copied to the device on a side stream one batch ahead
    # (CUDA) and normalised there, to the same float32 bits as the loader's normalisation. False:
    # the loader normalises and the float32 batch is copied on the compute stream.
    uint8_input: bool = True
    # The target encoder's block linears in float8 (e4m3, torchao; the `fp8` extra): weights quantised
    # once per step after the EMA, activations per forward. rowwise: one scale per token and per output
    # channel; tensorwise: one per tensor. Changes the function (the targets carry fp8 rounding, a few
    # per cent per element; models.fp8). Off by default: its learning check (profiling/RESULTS.md)
    # has not shown it loses nothing beyond the seed-to-seed spread, and no GPU has timed it.
    fp8_target: str = "off"
    # Bias, exact-erf GELU and residual adds computed in the epilogues of the blocks' GEMMs (Inductor's
    # max-autotune GEMM templates, epilogue fusion benchmarked against cuBLAS); needs compile. Same
    # function up to rounding (GELU reads the fp32 accumulator, not its bf16 copy). Off until a GPU
    # has measured its gain and its compile time (max-autotune benchmarks every GEMM shape).
    fused_epilogue: bool = False

    def validate(self, prefix: str = "speed") -> None:
        check_choice(f"{prefix}.preset", self.preset, PRESETS)
        check_choice(f"{prefix}.attention", self.attention, ATTENTION_BACKENDS)
        check_choice(f"{prefix}.compile", self.compile, COMPILE_MODES)
        check_choice(f"{prefix}.fp8_target", self.fp8_target, FP8_RECIPES)
        check(
            not (self.fused_epilogue and self.compile == "off"),
            f"{prefix}.fused_epilogue",
            self.fused_epilogue,
            "false when speed.compile=off (the epilogues are fused by the compiler)",
        )


# ``preset: authors``: the speed of the authors' training loop (facebookresearch/ijepa at 52c1ae9), so
# that "x authors" compares against what their code does on the same device. Each switch, and the
# lines it models:
#   attention="math"        explicit softmax(q k^T * scale) v with the N x N matrix in memory:
#                           src/models/vision_transformer.py:143-147 (Attention.forward)
#   compile="off"           their code compiles nothing
#   fused_ema=False         one mul_ and one add_ per parameter: src/train.py:333-336
#   fused_gather=False      apply_masks (expand, gather, cat: src/masks/utils.py:11-20) at
#                           src/models/vision_transformer.py:302,308,416 and src/train.py:301
#   fused_optimizer=False   torch.optim.AdamW(param_groups) with torch's defaults (foreach on CUDA):
#                           src/helper.py:142
#   grad_scaler=True        a GradScaler although they train in bf16: src/helper.py:155, used at
#                           src/train.py:322-325 (its step reads the found-inf flag to the host)
#   bf16_target_copy=False  the target encoder's fp32 weights cast by autocast at every forward (their
#                           target forward runs under the step's autocast, src/train.py:316)
#   bf16_residual=False     fp32 pos_embed and mask_token promote the stream to fp32: the adds after
#                           patch_embed and predictor_embed and the mask tokens' pos_embs
#                           (src/models/vision_transformer.py, both forward methods)
#   uint8_input=False       the loader normalises on the CPU and float32 images go to the device on
#                           the compute stream (load_imgs in src/train.py: imgs.to(device))
#   sync_every_step=True    every weight's gradient norm read to the host after the optimizer step
#                           (grad_logger, src/utils/logging.py:78-92, at src/train.py:329), float(loss)
#                           (src/train.py:338) and torch.cuda.synchronize() (gpu_timer,
#                           src/utils/logging.py:25, at src/train.py:339): ijepa_fast.train.step
# The same in every preset, so not switches: cudnn.benchmark (src/train.py:61; train.build.build_engine),
# bf16 autocast (src/train.py:316; run.dtype), the loss averaged over the ranks every step
# (AllReduce at src/train.py:312; Engine.mean_over_ranks), gradients set to None by zero_grad
# (src/train.py:330). Their AdamW has four parameter groups (helper.py:121-139) where ours has two,
# with the same per-parameter settings: the foreach kernels then take a few more launches per step.
AUTHORS_SPEED = dict(
    attention="math",
    compile="off",
    fused_ema=False,
    fused_gather=False,
    fused_optimizer=False,
    grad_scaler=True,
    sync_every_step=True,
    bf16_target_copy=False,
    bf16_residual=False,
    uint8_input=False,
    fp8_target="off",
    fused_epilogue=False,
)


@dataclass
class RunConfig:
    out_dir: str = "runs"  # the run folder is out_dir/name
    name: str = "ijepa"  # the run folder's name
    seed: int = 0  # weights, crops and masks all follow from it
    device: str = "auto"  # auto|cpu|cuda|cuda:N
    # auto (bf16 autocast where the device has native bf16, else fp32)|bf16|fp16 (with a GradScaler;
    # GPUs without bf16; never chosen by auto; not with run.engine=deepspeed)|fp32
    dtype: str = "auto"
    log_every: int = 10  # one host sync every log_every steps
    checkpoint_every: int = 1000  # steps; a checkpoint is also written at the end
    keep_checkpoints: int = 3  # the newest K checkpoints are kept
    # true: a save copies the state to host memory and writes it in the background (every engine)
    async_checkpoint: bool = True
    engine: str = "auto"  # auto (deepspeed under a multi-process launcher, else plain)|plain|deepspeed|fsdp2
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0-3
    ds_config: str = ""  # a DeepSpeed JSON whose values override the generated ones
    dist_timeout_s: float = 0.0  # a dead or stalled rank fails the others after this; 0: $IJEPA_DIST_TIMEOUT_S or 1800
    progress: bool = True  # a progress bar on rank 0
    tensorboard: bool = True  # TensorBoard events in run_dir/tb
    wandb: str = "off"  # Weights & Biases: off|on (= offline)|offline (files in run_dir/wandb)|online

    def validate(self, prefix: str = "run") -> None:
        check(bool(self.name), f"{prefix}.name", self.name, "a non-empty string")
        check_device(f"{prefix}.device", self.device)
        check_choice(f"{prefix}.dtype", self.dtype, DTYPES)
        check(self.log_every >= 1, f"{prefix}.log_every", self.log_every, "an integer >= 1")
        check(self.checkpoint_every >= 1, f"{prefix}.checkpoint_every", self.checkpoint_every, "an integer >= 1")
        check(self.keep_checkpoints >= 1, f"{prefix}.keep_checkpoints", self.keep_checkpoints, "an integer >= 1")
        check_choice(f"{prefix}.engine", self.engine, ENGINES)
        if self.engine == "deepspeed" and self.dtype == "fp16":
            use = f"use {prefix}.dtype=bf16 or fp32"
            raise ConfigError(f"{prefix}.dtype=fp16 is not supported by the DeepSpeed engine: {use}")
        check(self.dist_timeout_s >= 0, f"{prefix}.dist_timeout_s", self.dist_timeout_s, "seconds >= 0")
        check_choice(f"{prefix}.zero_stage", self.zero_stage, ZERO_STAGES)
        check_choice(f"{prefix}.wandb", self.wandb, WANDB_MODES)


@dataclass
class OnlineProbeConfig:
    """Scoring the target encoder while it trains (``train.online_probe``): kNN and a quick linear
    probe on the average-pooled features of a labelled subset, on rank 0, outside images/s."""

    every: int = 0  # score every N epochs (or steps, see unit); 0: off
    unit: str = "epochs"  # epochs|steps
    dataset: str = ""  # idx|folder (class sub-folders)|shards (webdataset tars with .cls); "": data.dataset
    root: str = ""  # the labelled data; "": data.root
    train_split: str = "train"  # idx: train|test; folder and shards: a sub-folder, or "" for the root
    test_split: str = ""  # "": test (idx) or val (folder, shards)
    train_images: int = 5000  # the first N images of the train split fit the heads
    test_images: int = 2000  # the first N images of the test split score them
    k: int = 20  # kNN neighbours (cosine similarity, temperature 0.07)
    linear_steps: int = 300  # the quick linear probe's Adam steps per (lr, wd) pair; 0: kNN only
    batch_size: int = 256  # images per forward pass while extracting features

    def validate(self, prefix: str = "online_probe") -> None:
        check(self.every >= 0, f"{prefix}.every", self.every, "an integer >= 0 (0: off)")
        check_choice(f"{prefix}.unit", self.unit, PROBE_UNITS)
        check(self.dataset in ("", *PROBE_DATASETS), f"{prefix}.dataset", self.dataset, "idx, folder, shards or ''")
        check(self.train_images >= 2, f"{prefix}.train_images", self.train_images, "an integer >= 2")
        check(self.test_images >= 1, f"{prefix}.test_images", self.test_images, "an integer >= 1")
        check(1 <= self.k <= self.train_images, f"{prefix}.k", self.k, "an integer in [1, train_images]")
        check(self.linear_steps >= 0, f"{prefix}.linear_steps", self.linear_steps, "an integer >= 0")
        check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "an integer >= 1")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    run: RunConfig = field(default_factory=RunConfig)
    online_probe: OnlineProbeConfig = field(default_factory=OnlineProbeConfig)

    def validate(self) -> Config:
        self._check_finite()
        for f in fields(self):
            getattr(self, f.name).validate(f.name)
        check(
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
            check(
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
    "data.image_check_cache",
    "run.out_dir",
    "run.name",
    "run.dist_timeout_s",
    "run.log_every",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.async_checkpoint",
    "run.progress",
    "run.tensorboard",
    "run.wandb",
    *(f"online_probe.{key}" for key in OnlineProbeConfig.__dataclass_fields__),
)


def differences(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """``{"section.key": (old value, new value)}`` for every key whose value differs."""
    before, after = flatten(old), flatten(new)
    return {key: (before[key], after[key]) for key in after if before[key] != after[key]}
