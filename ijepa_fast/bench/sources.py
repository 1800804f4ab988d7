"""What is timed: the run's spec, the rows of the table and the micro-batches they run on.

- **The spec** (``BenchSpec``): the training ``Config`` itself (its defaults are the paper's
  ViT-H/14 at 224 px, batch 128 per GPU), from a config file and ``section.key=value`` overrides,
  exactly as ``ijepa-pretrain`` reads it, plus how many steps of which data.
- **Rows** (``BenchConfig``): a name and the ``speed`` section it runs with. The ablation is the
  ``authors`` preset, then each optimisation switched on alone from it, then all on (the default).
  Compile is measured as the default with compile off (the authors' preset is never compiled); on
  a CPU that row is left out unless ``compile_on_cpu`` (compile is off on CPUs). The switches that
  are off by default (FP8 target, fused epilogues) are measured as the default with each one on.
- **Data.** ``synthetic`` (default): distinct micro-batches made once and held on the host as the
  loader hands them (random uint8 images, normalised to float32 unless the row has
  ``speed.uint8_input``; masks from the real ``MultiBlockMaskSampler``), fed to the device in turn
  by ``DeviceFeed`` as the trainer feeds them; ``pytorch``/``dali``: the real loaders over
  ``data.root``, each batch copied to the device inside the timed step.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

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
        ("+ bf16 target copy", {"bf16_target_copy": True}),
        ("+ bf16 residual stream", {"bf16_residual": True}),
        ("+ uint8 images to the device", {"uint8_input": True}),
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
    """``count`` distinct micro-batches on the host (pinned on CUDA), fed to the device in turn by
    ``DeviceFeed`` as the trainer's are: random uint8 images, handed as uint8 or as the loader's
    normalised float32 (``use``), and masks from the real sampler (steps 0..)."""

    def __init__(self, cfg: Config, device: torch.device, count: int):
        from ijepa_fast.data.loader import Batch
        from ijepa_fast.data.transforms import normalize

        B, S, seed = cfg.data.batch_size, cfg.data.crop_size, cfg.run.seed
        sampler = MultiBlockMaskSampler(grid_size(S, cfg.model.patch_size), seed=seed, **asdict(cfg.mask))
        g = torch.Generator().manual_seed(seed)
        raw = [torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, generator=g) for _ in range(count)]
        pin = device.type == "cuda"
        self._host: dict[bool, list] = {}
        for uint8 in (False, True):
            self._host[uint8] = [
                Batch(
                    images=x if uint8 else normalize(x),
                    labels=torch.zeros(B, dtype=torch.int64),
                    masks=sampler(B, step=i),
                    step=i,
                    epoch=0,
                    skipped=0,
                )
                for i, x in enumerate(raw)
            ]
            if pin:
                self._host[uint8] = [b.pin_memory() for b in self._host[uint8]]
        self.device, self.kind = device, "synthetic"
        self.use(cfg.speed.uint8_input)

    def use(self, uint8: bool) -> None:
        """Hand uint8 images (``speed.uint8_input``) or normalised float32 ones from now on."""
        self._uint8 = uint8
        self._restart(0)

    def _restart(self, i: int) -> None:
        from ijepa_fast.data.device_feed import DeviceFeed

        n = len(self._host[self._uint8])
        order = itertools.cycle([self._host[self._uint8][(i + j) % n] for j in range(n)])
        self._feed, self._next = iter(DeviceFeed(order, self.device)), i

    def __len__(self) -> int:
        return len(self._host[False])

    def get(self, i: int) -> tuple[torch.Tensor, MaskBatch]:
        """Micro-batch ``i`` (the batches are used in turn), on the device."""
        if i != self._next:  # not the next in turn: the feed restarts there
            self._restart(i)
        self._next = i + 1
        batch = next(self._feed)
        return batch.images, batch.masks

    def close(self) -> None:
        pass


def check_loader_data(cfg: Config) -> None:
    """The real loader's ``data.root`` is given and holds a dataset (ValueError, FileNotFoundError)."""
    from ijepa_fast.data.sources import check_data_source

    if not cfg.data.root:
        raise ValueError(
            f"--loader {cfg.data.loader} reads real images: give data.root=DIR (an image folder, or IDX files with "
            f"data.dataset=idx)"
        )
    check_data_source(cfg.data)


class LoaderBatches:
    """Micro-batches of the run's real loader (``pytorch`` or ``dali``), copied to the device as the trainer does."""

    def __init__(self, cfg: Config, device: torch.device):
        from ijepa_fast.data.build import build_loader

        kind = cfg.data.loader
        check_loader_data(cfg)
        grid = grid_size(cfg.data.crop_size, cfg.model.patch_size)
        self.loader = build_loader(cfg, grid, device, rank=0, world_size=1, start_step=0)
        self.device, self.kind = device, kind
        self._it: Iterator = iter(self.loader)
        from ijepa_fast.data.transforms import normalization_stats

        self._stats = normalization_stats(device)

    def __len__(self) -> int:
        return 1

    def get(self, i: int) -> tuple[torch.Tensor, MaskBatch]:
        from ijepa_fast.data.device_feed import batch_to_device

        batch = batch_to_device(next(self._it), self.device, self._stats)
        return batch.images, batch.masks

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
