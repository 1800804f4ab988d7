"""What is timed: the run's spec, the rows of the table and the micro-batches they run on.

- **The spec** (``BenchSpec``): the training ``Config`` itself (its defaults are the paper's
  ViT-H/14 at 224 px, batch 128 per GPU), from a config file and ``section.key=value`` overrides,
  exactly as ``ijepa-pretrain`` reads it, plus how many steps of which data.
- **Rows** (``BenchConfig``): a name and the ``speed`` section it runs with. The ablation is the
  ``authors`` preset, then each optimisation switched on alone from it, then all on (the default).
  Compile is measured as the default with compile off (the authors' preset is never compiled); on
  a CPU that row is left out unless ``compile_on_cpu`` (compile is off on CPUs). The switches that
  are off by default (FP8 target, fused epilogues) are measured as the default with each one on.
- **Data.** ``synthetic`` (default): distinct micro-batches made once on the device, random images
  and masks from the real ``MultiBlockMaskSampler``, used in turn; ``pytorch``/``dali``: the real
  loaders over ``data.root``, each batch copied to the device inside the timed step.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ijepa_fast import config as config_mod
from ijepa_fast.config import Config
from ijepa_fast.masks.sampler import MaskBatch, MultiBlockMaskSampler
from ijepa_fast.models.vit import grid_size


@dataclass
class BenchSpec:
    """What to run: the training config (file and overrides) and how many steps of which data."""

    config: str = ""  # a YAML config (ours or the authors'); "" is Config()'s defaults: ViT-H/14, 224 px, batch 128
    overrides: list[str] = field(default_factory=list)  # section.key=value, applied to every row
    warmup: int = 5
    steps: int = 20
    phase_steps: int = 5
    batches: int = 4  # distinct synthetic micro-batches, used in turn
    loader: str = "synthetic"  # synthetic|pytorch|dali
    trace: str = ""
    trace_steps: int = 2

    def config_for(self, speed: dict) -> Config:
        """The Config of one row: the file, then the row's ``speed`` section, then the overrides."""
        cfg = config_mod.from_dict({"speed": dict(speed)}, base=config_mod.load(self.config or None))
        if self.loader != "synthetic":
            cfg = config_mod.apply_overrides(cfg, [f"data.loader={self.loader}"])
        cfg = config_mod.apply_overrides(cfg, self.overrides)
        return config_mod.apply_overrides(cfg, ["run.progress=false", "run.tensorboard=false"])

    def describe(self) -> dict:
        """The spec with the base config's shape (model, patch, img, batch...), for the reports."""
        cfg = self.config_for({})
        return {
            **asdict(self),
            "model": cfg.model.name,
            "patch": cfg.model.patch_size,
            "img": cfg.data.crop_size,
            "batch": cfg.data.batch_size,
            "grad_accum": cfg.optim.grad_accum,
            "pred_depth": cfg.model.pred_depth,
            "device": cfg.run.device,
            "dtype": cfg.run.dtype,
        }


@dataclass(frozen=True)
class BenchConfig:
    """One row of the table: a name and the ``speed`` section it runs with."""

    name: str
    speed: dict

    @property
    def compiles(self) -> bool:
        return self.speed.get("compile") == "on" or (
            self.speed.get("compile", "auto") == "auto" and self.speed.get("preset") != "authors"
        )


def ablation_configs(device: torch.device, compile_on_cpu: bool = False) -> list[BenchConfig]:
    """``authors``, each switch alone on top of it, then everything on (the default ``fast``).

    Compile is measured from the default's side instead (``all on, compile off``): the authors'
    preset is never compiled, since nobody trains that way and Inductor's cold compile of it would
    cost about as much as the rest of the ablation. On a CPU, where the default does not compile,
    that row is left out unless ``compile_on_cpu``, which compiles the default there."""
    on = [
        ("+ sdpa attention", {"attention": "sdpa"}),
        ("+ fused EMA", {"fused_ema": True}),
        ("+ fused gather", {"fused_gather": True}),
        ("+ fused AdamW", {"fused_optimizer": True}),
        ("- GradScaler", {"grad_scaler": False}),
        ("- per-step host sync", {"sync_every_step": False}),
    ]
    rows = [authors_config()]
    rows += [BenchConfig(name, {"preset": "authors", **change}) for name, change in on]
    # Off by default, so measured from the default's side: float8 for the target encoder (either
    # recipe; emulated on a CPU), and fused epilogues (compiled: on a CPU only with compile_on_cpu).
    float8 = [BenchConfig(f"all on + FP8 target ({r})", {"preset": "fast", "fp8_target": r}) for r in FP8_ROWS]
    if device.type != "cuda" and not compile_on_cpu:
        return [*rows, *float8, default_config()]
    compiled = {"preset": "fast"} if device.type == "cuda" else {"preset": "fast", "compile": "on"}
    default = default_config() if device.type == "cuda" else BenchConfig(default_config().name, compiled)
    fused = BenchConfig("all on + fused epilogue", {**compiled, "fused_epilogue": True})
    return [*rows, *float8, fused, BenchConfig("all on, compile off", {"preset": "fast", "compile": "off"}), default]


FP8_ROWS = ("rowwise", "tensorwise")


def default_config() -> BenchConfig:
    return BenchConfig("all on (default)", {"preset": "fast"})


def authors_config() -> BenchConfig:
    return BenchConfig("authors", {"preset": "authors"})


# ----------------------------------------------------------------------------------------- data


class SyntheticBatches:
    """``count`` device-resident micro-batches: random images, masks from the real sampler (steps 0..)."""

    def __init__(self, cfg: Config, device: torch.device, count: int):
        B, S, seed = cfg.data.batch_size, cfg.data.crop_size, cfg.run.seed
        sampler = MultiBlockMaskSampler(grid_size(S, cfg.model.patch_size), seed=seed, **asdict(cfg.mask))
        g = torch.Generator(device=device).manual_seed(seed)
        self.images = [torch.randn(B, 3, S, S, device=device, generator=g) for _ in range(count)]
        self.masks = [sampler(B, step=i, device=device) for i in range(count)]
        self.kind = "synthetic"

    def __len__(self) -> int:
        return len(self.images)

    def get(self, i: int) -> tuple[torch.Tensor, MaskBatch]:
        """Micro-batch ``i`` (the batches are used in turn)."""
        return self.images[i % len(self.images)], self.masks[i % len(self.masks)]

    def close(self) -> None:
        pass


class LoaderBatches:
    """Micro-batches of the run's real loader (``pytorch`` or ``dali``), copied to the device as the trainer does."""

    def __init__(self, cfg: Config, device: torch.device):
        from ijepa_fast.data.build import build_loader
        from ijepa_fast.data.loader import check_data_source

        kind = cfg.data.loader
        if not cfg.data.root:
            raise ValueError(
                f"--loader {kind} reads real images: give data.root=DIR (an image folder, or IDX files with "
                f"data.dataset=idx)"
            )
        check_data_source(cfg.data)
        grid = grid_size(cfg.data.crop_size, cfg.model.patch_size)
        self.loader = build_loader(cfg, grid, device, rank=0, world_size=1, start_step=0, run_dir=Path(cfg.run.out_dir))
        self.device, self.kind = device, kind
        self._it: Iterator = iter(self.loader)

    def __len__(self) -> int:
        return 1

    def get(self, i: int) -> tuple[torch.Tensor, MaskBatch]:
        batch = next(self._it)
        return batch.images.to(self.device, non_blocking=True), batch.masks.to(self.device, non_blocking=True)

    def close(self) -> None:
        close = getattr(self.loader, "close", None)
        if close is not None:
            close()


# ----------------------------------------------------------------------------------------- from the command line


def spec_from_args(args: argparse.Namespace) -> BenchSpec:
    return BenchSpec(
        config=args.config,
        overrides=[*args.overrides, *args.more_overrides],
        warmup=args.warmup,
        steps=args.steps,
        phase_steps=args.phase_steps,
        batches=args.batches,
        loader=args.loader,
        trace=args.trace,
        trace_steps=args.trace_steps,
    )


def select_configs(args: argparse.Namespace, device: torch.device) -> list[BenchConfig]:
    if args.ablation:
        configs = ablation_configs(device, args.compile_on_cpu)
    elif args.compare_authors:
        configs = [authors_config(), default_config()]
    else:
        configs = [default_config()]
    if args.configs:
        known = {c.name: c for c in ablation_configs(torch.device("cuda"))}  # every row a GPU run has
        missing = [n for n in args.configs if n not in known]
        if missing:
            raise SystemExit(f"--configs: unknown {missing}; known: {list(known)}")
        configs = [known[n] for n in args.configs]
    return configs
