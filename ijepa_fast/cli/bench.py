"""Profiling harness for the training step: throughput, MFU, phase split, ablation, GPU-hours.

    ijepa-bench [--config FILE] [section.key=value ...] [--ablation] [--out DIR] [--record]
    python -m profiling.bench_step ...   (the same CLI)

The run is described by the training ``Config`` itself (its defaults are the paper's ViT-H/14 at
224 px, batch 128 per GPU), from ``--config`` and ``section.key=value`` overrides, exactly as
``ijepa-pretrain`` reads it. What it measures:

- **The trainer's step.** Each row builds the step ``ijepa-pretrain`` runs
  (``train.build.build_train_step``: models, attention backend, compile, engine, AdamW, schedules) and
  times ``--steps`` optimizer steps (each of ``optim.grad_accum`` micro-batches) after ``--warmup``
  untimed ones (at least one per distinct batch, so ``torch.compile`` has met every mask shape).
- **Data.** ``--loader synthetic`` (default): ``--batches`` distinct micro-batches made once on the
  device, random images and masks from the real ``MultiBlockMaskSampler``, used in turn;
  ``--loader pytorch``/``dali``: the real loaders over ``data.root``, each batch copied to the
  device inside the timed step.
- **Timing.** CUDA: one event per step boundary, a single sync at the end; step times are the
  differences (median, 20th and 80th percentiles), images/s is images over the wall time between
  a sync before and after the timed steps. CPU: ``time.perf_counter`` per step.
- **FLOPs and MFU.** ``ijepa_fast.models.flops`` per image for the mask sizes of the timed batches;
  achieved TFLOP/s = FLOPs per image * images/s; MFU against the device's dense bf16 peak
  (``PEAK_BF16_TFLOPS``, by device name; n/a on a CPU) and, on CUDA, against a measured bf16
  8192^3 matmul.
- **Phase split.** ``--phase-steps`` further steps of the same ``TrainStep``, called with a phase
  clock as its ``mark`` callback (data, target_fwd, context_fwd, predictor_fwd, backward,
  optimizer, ema, sync): CUDA events (no sync inside the step, so it runs as it does unsplit) or
  ``perf_counter`` on a CPU. The table shows the split next to the plain step's median
  (``phases/step``: about 1 when the split is faithful).
- **Ablation** (``--ablation``): the ``authors`` preset, then each optimisation switched on alone
  from it, then all on (the default), one process, one table with the speed-up over ``authors``.
  Compile is measured as the default with compile off (the authors' preset is never compiled); on
  a CPU that row is left out unless ``--compile-on-cpu`` (compile is off on CPUs).
- **GPU-hours.** From the measured images/s per GPU, the GPU-hours of the paper's runs (ViT-H/14
  300 epochs of ImageNet-1k; ViT-H/16 at 448 px, 300 epochs), beside the paper's figure; a run of
  another model is scaled by the FLOP ratio and says so.
- **Outputs.** A Markdown report (printed; appended to ``profiling/RESULTS.md`` with ``--record``,
  with device, date, commit and the exact command), JSON and PNG plots (``--out DIR``), and a
  torch.profiler Chrome trace of phase-labelled steps (``--trace PATH``, ``.gz`` compresses).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import gzip
import itertools
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ijepa_fast import config as config_mod
from ijepa_fast.cli.args import command_parser
from ijepa_fast.config import Config
from ijepa_fast.masks.sampler import MaskBatch, MultiBlockMaskSampler
from ijepa_fast.models.flops import step_flops, step_flops_for_masks
from ijepa_fast.models.vit import grid_size
from ijepa_fast.runtime.device import resolve_device, resolve_precision, synchronize
from ijepa_fast.runtime.distributed import detect
from ijepa_fast.train.build import build_train_step, start_process
from ijepa_fast.train.step import TrainStep

# Dense bf16 tensor-core peaks from the vendor's datasheets (TFLOP/s), matched in this order against
# torch.cuda.get_device_name(); the H100 rows differ by form factor. Used for MFU only.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)
PHASES = ("data", "target_fwd", "context_fwd", "predictor_fwd", "backward", "optimizer", "ema", "sync")
IMAGENET_TRAIN_IMAGES = 1_281_167


@dataclass(frozen=True)
class PaperRun:
    """A pretraining run of the paper, for the GPU-hours projection."""

    label: str
    model: str
    patch: int
    img: int
    epochs: int
    images: int = IMAGENET_TRAIN_IMAGES
    paper_gpu_hours: float | None = None
    paper_device: str = ""


PAPER_RUNS = (
    # The paper (Assran et al., CVPR 2023): 16 A100, under 72 hours, "less than 1200 GPU hours".
    PaperRun("ViT-H/14, 224 px, 300 ep IN-1k", "vit_huge", 14, 224, 300, paper_gpu_hours=1200.0, paper_device="A100"),
    # The authors' config in1k_vith16-448_ep300 (configs/); the paper states no GPU-hours for it.
    PaperRun("ViT-H/16, 448 px, 300 ep IN-1k", "vit_huge", 16, 448, 300),
)


def default_pred_depth(model: str) -> int:
    """Predictor depth as in the paper (Assran et al., CVPR 2023): 6 for ViT-B (and the smaller
    sizes), 12 for ViT-L/H, 16 for ViT-G."""
    return {"vit_large": 12, "vit_huge": 12, "vit_giant": 16}.get(model, 6)


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
    compile_on_cpu: bool = False
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
    rows = [BenchConfig("authors", {"preset": "authors"})]
    rows += [BenchConfig(name, {"preset": "authors", **change}) for name, change in on]
    if device.type != "cuda" and not compile_on_cpu:
        return [*rows, default_config()]
    default = (
        default_config()
        if device.type == "cuda"
        else BenchConfig(default_config().name, {"preset": "fast", "compile": "on"})
    )
    return [*rows, BenchConfig("all on, compile off", {"preset": "fast", "compile": "off"}), default]


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


# ----------------------------------------------------------------------------------------- timing


class PhaseClock:
    """Phase boundaries of a step: ``phase(name)`` starts a phase (ending the previous one),
    ``stop()`` ends the last. CUDA events read after one sync, or perf_counter on a CPU; with
    ``label=True`` each phase is also a torch.profiler ``record_function`` range (for traces)."""

    def __init__(self, device: torch.device, label: bool = False):
        self.cuda = device.type == "cuda"
        self.label = label
        self.names: list[str] = []
        self.marks: list = []
        self._range = None

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def phase(self, name: str) -> None:
        self._close_range()
        self.names.append(name)
        self.marks.append(self._now())
        if self.label:
            self._range = torch.profiler.record_function(name)
            self._range.__enter__()

    def stop(self) -> None:
        self._close_range()
        self.marks.append(self._now())

    def _close_range(self) -> None:
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None

    def durations_ms(self) -> dict[str, float]:
        """{phase: ms}; on CUDA call after a synchronize."""
        out: dict[str, float] = {}
        for name, a, b in zip(self.names, self.marks, self.marks[1:]):
            out[name] = out.get(name, 0.0) + (a.elapsed_time(b) if self.cuda else (b - a) * 1e3)
        return out


def optimizer_step(ts: TrainStep, source, step: int, mark=None) -> dict[str, torch.Tensor]:
    """One optimizer step of ``ts``: its ``grad_accum`` micro-batches (micro-batch ``step * k + j``),
    each fetched under the ``data`` phase when a phase ``mark`` is given."""
    k, out = ts.grad_accum, {}
    for j in range(k):
        if mark is not None:
            mark("data")
        images, masks = source.get(step * k + j)
        out = ts(images, masks, step) if mark is None else ts(images, masks, step, mark=mark)
    return out


def percentiles(values: list[float]) -> dict[str, float]:
    """Median and 20th / 80th percentiles (inclusive method; one value is all three)."""
    if not values:
        return {"median": math.nan, "p20": math.nan, "p80": math.nan}
    if len(values) == 1:
        return {"median": values[0], "p20": values[0], "p80": values[0]}
    q = statistics.quantiles(values, n=10, method="inclusive")
    return {"median": statistics.median(values), "p20": q[1], "p80": q[7]}


def time_steps(ts: TrainStep, source, first_step: int, count: int, device: torch.device) -> dict:
    """Time ``count`` optimizer steps; returns per-step ms, data-wait ms, wall seconds, mask shapes, loss."""
    cuda = device.type == "cuda"
    marks, waits, shapes = [], [], []
    out = None

    def fetch_timed(i: int):
        t0 = time.perf_counter()
        images, masks = source.get(i)
        waits.append((time.perf_counter() - t0) * 1e3)
        shapes.append((masks.targets.shape[0], masks.context.shape[1], masks.targets.shape[2]))
        return images, masks

    timed = _Fetcher(fetch_timed)
    synchronize(device)
    wall0 = time.perf_counter()
    for i in range(count):
        marks.append(_now(cuda))
        out = optimizer_step(ts, timed, first_step + i)
    marks.append(_now(cuda))
    synchronize(device)
    wall = time.perf_counter() - wall0
    step_ms = [a.elapsed_time(b) if cuda else (b - a) * 1e3 for a, b in itertools.pairwise(marks)]
    return {
        "step_ms": step_ms,
        "data_wait_ms": waits,
        "wall_s": wall,
        "mask_shapes": shapes,
        "loss": float(out["loss"]) if out else math.nan,
    }


class _Fetcher:
    """A batch source whose ``get`` is a given function."""

    def __init__(self, get):
        self.get = get


def _now(cuda: bool):
    if cuda:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev
    return time.perf_counter()


def time_phases(ts: TrainStep, source, first_step: int, count: int, device: torch.device) -> dict[str, float]:
    """Median ms per phase (summed over the micro-batches of a step) over ``count`` optimizer steps,
    run back to back as the plain steps are (one sync after the last: on CUDA the host keeps
    queueing ahead of the GPU)."""
    clocks = []
    for i in range(count):
        clocks.append(PhaseClock(device))
        optimizer_step(ts, source, first_step + i, mark=clocks[-1].phase)
        clocks[-1].stop()
    synchronize(device)
    per_phase: dict[str, list[float]] = {}
    for clock in clocks:
        for name, ms in clock.durations_ms().items():
            per_phase.setdefault(name, []).append(ms)
    return {name: statistics.median(v) for name, v in per_phase.items()}


def write_trace(ts: TrainStep, source, first_step: int, count: int, device: torch.device, path: str) -> str:
    """A torch.profiler Chrome trace of ``count`` phase-labelled steps; ``.gz`` paths are compressed."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(count):
            with torch.profiler.record_function(f"step {first_step + i}"):
                clock = PhaseClock(device, label=True)
                optimizer_step(ts, source, first_step + i, mark=clock.phase)
                clock.stop()
        synchronize(device)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".gz":
        raw = out.with_suffix("")
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    else:
        prof.export_chrome_trace(str(out))
    return str(out)


# ----------------------------------------------------------------------------------------- device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads != 1 else ''})"


def peak_bf16_tflops(name: str) -> float | None:
    """The datasheet dense bf16 peak for a CUDA device name, None when unknown (or a CPU)."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def measure_matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float | None:
    """Achieved bf16 TFLOP/s of an n^3 matmul on random data (CUDA only): the practical ceiling."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2.0 * n**3 * reps / (start.elapsed_time(end) * 1e-3) / 1e12


def git_commit(repo: Path | None = None) -> str:
    """``IJEPA_COMMIT`` if set (a copy without .git), else ``git rev-parse --short HEAD`` (+ "-dirty")."""
    if os.environ.get("IJEPA_COMMIT"):
        return os.environ["IJEPA_COMMIT"]
    cwd = str(repo or Path(__file__).resolve().parent.parent)
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------------------- one configuration


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _build_step(cfg: Config, device: torch.device) -> TrainStep:
    start_process(cfg, detect())  # run.engine=deepspeed needs a process group, also in a world of one
    torch.manual_seed(cfg.run.seed)
    steps_per_epoch = max(1, IMAGENET_TRAIN_IMAGES // (cfg.data.batch_size * cfg.optim.grad_accum))
    # Parameters are created (and initialised) on the GPU directly: ViT-H's 1.3B on a CPU take long.
    with torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return build_train_step(cfg, device, steps_per_epoch)


def run_config(
    spec: BenchSpec,
    conf: BenchConfig,
    device: torch.device,
    source,
    peak: float | None,
    matmul_peak: float | None,
    trace: bool = False,
) -> dict:
    """Build, warm up and time one configuration; errors (OOM, a missing backend) become the row's
    ``error`` so one bad configuration does not lose the others."""
    row: dict = {"name": conf.name, "speed": conf.speed}
    ts = None
    try:
        cfg = spec.config_for(conf.speed)
        row["batch"] = cfg.data.batch_size * cfg.optim.grad_accum  # images per optimizer step
        if cfg.speed.compile == "on" or (cfg.speed.compile == "auto" and device.type == "cuda"):
            torch._dynamo.reset()  # each compiled configuration starts clean, as a training process does
        row["speed_resolved"] = asdict(cfg.speed)
        ts = _build_step(cfg, device)
        row["attention"] = ts.student.encoder.blocks[0].attn.backend
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        # at least one step per distinct micro-batch, so compile has met every mask shape
        warmup = max(spec.warmup, -(-len(source) // ts.grad_accum))
        for step in range(warmup):
            optimizer_step(ts, source, step)
        step = warmup
        synchronize(device)
        row["warmup_s"] = time.perf_counter() - t0
        timing = time_steps(ts, source, step, spec.steps, device)
        step += spec.steps
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        row.update(_rates(cfg, timing, peak, matmul_peak))
        if spec.phase_steps > 0:
            phases = time_phases(ts, source, step, spec.phase_steps, device)
            step += spec.phase_steps
            row["phases_ms"] = phases
            row["phases_total_ms"] = sum(phases.values())
            row["phases_over_step"] = row["phases_total_ms"] / row["step_ms_median"]
        if trace and spec.trace:
            row["trace"] = write_trace(ts, source, step, spec.trace_steps, device, spec.trace)
        row["ok"] = True
    except Exception as exc:  # recorded in the row and the report; main exits non-zero if no row ran
        row["ok"] = False
        oom = isinstance(exc, torch.OutOfMemoryError)
        row["error"] = "out of memory" if oom else f"{type(exc).__name__}: {exc}"
    finally:
        del ts
        _free(device)
    return row


def _rates(cfg: Config, timing: dict, peak: float | None, matmul_peak: float | None) -> dict:
    steps = len(timing["step_ms"])
    images_per_step = cfg.data.batch_size * cfg.optim.grad_accum
    ips = images_per_step * steps / timing["wall_s"]
    st = percentiles(timing["step_ms"])
    shapes = timing["mask_shapes"]
    flops_img = step_flops_for_masks(cfg.model, cfg.data.crop_size, shapes)
    tflops = flops_img * ips / 1e12
    return {
        "steps": steps,
        "images_per_s": ips,
        "tokens_per_s": ips * grid_size(cfg.data.crop_size, cfg.model.patch_size) ** 2,
        "step_ms_median": st["median"],
        "step_ms_p20": st["p20"],
        "step_ms_p80": st["p80"],
        "data_wait_ms_median": percentiles(timing["data_wait_ms"])["median"],
        "gflop_per_image": flops_img / 1e9,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "mfu_vs_matmul": tflops / matmul_peak if matmul_peak else None,
        "mean_kc": statistics.fmean(s[1] for s in shapes),
        "mean_kt": statistics.fmean(s[2] for s in shapes),
        "num_pred_masks": shapes[0][0],
        "loss": timing["loss"],
    }


# ----------------------------------------------------------------------------------------- the run


def run(
    spec: BenchSpec,
    configs: list[BenchConfig],
    on_row: Callable[[dict, dict], None] | None = None,
    device_label: str = "",
    command: str = "",
) -> dict:
    """Run every configuration in this process; returns ``{"meta", "rows", "projection"}``.

    ``on_row(result_so_far, row)`` is called after each row (the CLI rewrites its JSON there, so a
    run stopped by a timeout keeps what it measured)."""
    base_cfg = spec.config_for(configs[0].speed if configs else {})
    device = resolve_device(base_cfg.run.device)
    driver_name = device_name(device)
    peak = peak_bf16_tflops(driver_name) if device.type == "cuda" else None
    name = device_label or driver_name
    matmul_peak = measure_matmul_tflops(device)
    if spec.loader == "synthetic":
        source = SyntheticBatches(base_cfg, device, spec.batches)
    else:
        source = LoaderBatches(base_cfg, device)
    precision = resolve_precision(device, base_cfg.run.dtype)
    meta = {
        "device": name,
        "device_driver_name": driver_name,
        "device_type": device.type,
        "peak_bf16_tflops": peak,
        "matmul_bf16_tflops": matmul_peak,
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "command": command or current_command(),
        "spec": spec.describe(),
        "amp": precision.name,
        "amp_reason": precision.reason,
        "pred_depth": base_cfg.model.pred_depth,
        "loader": spec.loader,
    }
    result = {"meta": meta, "rows": [], "projection": []}
    # Order of measurement: authors and the default first (the two that matter most, should a time
    # limit stop the run), then the single switches, compile last (slowest to build).
    order = sorted(
        range(len(configs)),
        key=lambda i: (configs[i].name not in ("authors", default_config().name), configs[i].compiles, i),
    )
    names = [c.name for c in configs]
    traced = default_config().name if default_config().name in names else names[-1]  # what --trace records
    rows: dict[int, dict] = {}
    try:
        for i in order:
            rows[i] = run_config(spec, configs[i], device, source, peak, matmul_peak, trace=configs[i].name == traced)
            result["rows"] = [rows[j] for j in sorted(rows)]
            add_speedups(result["rows"])
            result["projection"] = project(result["rows"], base_cfg, device_name=name)
            if on_row is not None:
                on_row(result, rows[i])
    finally:
        source.close()
    return result


def add_speedups(rows: list[dict]) -> None:
    base = next((r for r in rows if r["name"] == "authors" and r.get("ok")), None)
    for r in rows:
        r["speedup_vs_authors"] = (r["images_per_s"] / base["images_per_s"]) if base and r.get("ok") else None


# ----------------------------------------------------------------------------------------- projection


def gpu_hours(images_per_s_per_gpu: float, epochs: float, images: int = IMAGENET_TRAIN_IMAGES) -> float:
    """GPU-hours of ``epochs`` passes over ``images`` at a per-GPU rate (perfect scaling assumed)."""
    if images_per_s_per_gpu <= 0:
        raise ValueError(f"images/s must be positive, got {images_per_s_per_gpu}")
    return epochs * images / images_per_s_per_gpu / 3600.0


def mean_mask_sizes(
    grid: int, batch: int = 128, batches: int = 4, seed: int = 0, **mask_kwargs
) -> tuple[int, float, float]:
    """(M, mean Kc, mean Kt) of the real sampler over ``batches`` batches."""
    sampler = MultiBlockMaskSampler(grid, seed=seed, **mask_kwargs)
    kc, kt, m = [], [], 4
    for s in range(batches):
        mb = sampler(batch, step=s)
        m, _, k = mb.targets.shape
        kc.append(mb.context.shape[1])
        kt.append(k)
    return m, statistics.fmean(kc), statistics.fmean(kt)


def project(rows: list[dict], cfg: Config, device_name: str) -> list[dict]:
    """GPU-hours of each ``PAPER_RUNS`` entry from the default configuration's images/s (or, when
    it did not run, the fastest configuration's).

    A run of the same model, patch and image size is ``measured``; otherwise images/s is scaled by
    the per-image FLOP ratio (same MFU assumed) and the row says so."""
    ok = [r for r in rows if r.get("ok")]
    if not ok:
        return []
    default = [r for r in ok if r["name"] == default_config().name]
    best = default[0] if default else max(ok, key=lambda r: r["images_per_s"])
    out = []
    model, patch, img = cfg.model.name, cfg.model.patch_size, cfg.data.crop_size
    for pr in PAPER_RUNS:
        if (pr.model, pr.patch, pr.img) == (model, patch, img):
            ips, basis = best["images_per_s"], f"measured ({best['name']}, batch {best['batch']})"
        else:
            m, kc, kt = mean_mask_sizes(grid_size(pr.img, pr.patch), batch=32, batches=2)
            target = step_flops(pr.model, pr.patch, pr.img, kc, kt, m, default_pred_depth(pr.model), 384).total
            ips = best["images_per_s"] * best["gflop_per_image"] * 1e9 / target
            basis = f"FLOP-scaled from {model}/{patch}@{img} ({best['name']})"
        out.append(
            {
                "run": pr.label,
                "device": device_name,
                "images_per_s_per_gpu": ips,
                "basis": basis,
                "gpu_hours": gpu_hours(ips, pr.epochs, pr.images),
                "paper_gpu_hours": pr.paper_gpu_hours,
                "paper_device": pr.paper_device,
                "paper_images_per_s_per_gpu": (
                    pr.epochs * pr.images / (pr.paper_gpu_hours * 3600.0) if pr.paper_gpu_hours else None
                ),
            }
        )
    return out


# ----------------------------------------------------------------------------------------- reports


def _f(x, fmt: str = ".1f", none: str = "n/a") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, fmt)


def markdown_report(result: dict) -> str:
    """The report: a header with device, date, commit and command, then throughput, phases, GPU-hours."""
    meta, rows = result["meta"], result["rows"]
    spec = meta["spec"]
    ok = [r for r in rows if r.get("ok")]
    lines = [
        f"### {spec['model']}/{spec['patch']} at {spec['img']} px, batch {spec['batch']} · {meta['device']} "
        f"· {meta['date']}",
        "",
        f"- device: {meta['device']} (bf16 peak {_f(meta['peak_bf16_tflops'], '.0f')} TFLOP/s datasheet"
        f", {_f(meta['matmul_bf16_tflops'], '.0f')} measured 8192^3 matmul); torch {meta['torch']}",
        f"- commit: `{meta['commit']}`; command: `{meta['command']}`",
        f"- autocast: {meta['amp']} ({meta.get('amp_reason', 'reason not recorded')}); data: {meta['loader']}; "
        f"predictor depth {meta['pred_depth']}; "
        f"steps: {spec['warmup']} warm-up, {spec['steps']} timed, {spec['phase_steps']} phase-split",
    ]
    if ok:
        r0 = ok[0]
        lines.append(
            f"- masks (timed batches): M = {r0['num_pred_masks']}, mean Kc = {r0['mean_kc']:.1f}, "
            f"mean Kt = {r0['mean_kt']:.1f}; {r0['gflop_per_image']:.3g} GFLOP per image "
            f"(ijepa_fast.models.flops)"
        )
    lines += [
        "",
        "| configuration | images/s | x authors | step ms median (p20-p80) | patch tokens/s | TFLOP/s "
        "| MFU | peak mem GiB | attention |",
        "|" + "---|" * 9,
    ]
    for r in rows:
        if not r.get("ok"):
            err = " ".join(str(r.get("error", "?")).split()).replace("|", "/")[:200]
            lines.append(f"| {r['name']} | failed: {err} |  |  |  |  |  |  |  |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        lines.append(
            f"| {r['name']} | {r['images_per_s']:.1f} | {_f(r.get('speedup_vs_authors'), '.2f')} "
            f"| {r['step_ms_median']:.1f} ({r['step_ms_p20']:.1f}-{r['step_ms_p80']:.1f}) "
            f"| {r['tokens_per_s']:.0f} | {r['tflops']:.2f} | {mfu} | {_f(r.get('peak_mem_gib'), '.1f')} "
            f"| {r.get('attention', '?')} |"
        )
    phased = [r for r in ok if r.get("phases_ms")]
    if phased:
        lines += [
            "",
            "Phase split, ms (median of the phase-split steps; "
            + ("CUDA events" if meta["device_type"] == "cuda" else "perf_counter")
            + "):",
            "",
            "| configuration | " + " | ".join(PHASES) + " | sum | plain step | phases/step |",
            "|" + "---|" * (len(PHASES) + 4),
        ]
        for r in phased:
            cells = " | ".join(_f(r["phases_ms"].get(p), ".2f", "-") for p in PHASES)
            lines.append(
                f"| {r['name']} | {cells} | {r['phases_total_ms']:.1f} | {r['step_ms_median']:.1f} "
                f"| {r['phases_over_step']:.2f} |"
            )
    if result.get("projection"):
        lines += [
            "",
            "GPU-hours (one GPU's rate times the GPUs, perfect scaling):",
            "",
            "| run | images/s per GPU | basis | GPU-hours (ours, device) | paper |",
            "|---|---|---|---|---|",
        ]
        for p in result["projection"]:
            paper = (
                (
                    f"< {p['paper_gpu_hours']:.0f} {p['paper_device']} GPU-hours "
                    f"(>= {p['paper_images_per_s_per_gpu']:.0f} images/s per GPU)"
                )
                if p["paper_gpu_hours"]
                else "n/a"
            )
            lines.append(
                f"| {p['run']} | {p['images_per_s_per_gpu']:.1f} | {p['basis']} "
                f"| {p['gpu_hours']:,.0f} ({p['device']}) | {paper} |"
            )
    return "\n".join(lines) + "\n"


def record(result: dict, path: str | Path) -> Path:
    """Append the report to a RESULTS.md-style file (created if missing, e.g. a file to append later)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write("\n" + markdown_report(result))
    return path


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(path)
    return path


def write_plots(result: dict, out_dir: str | Path, prefix: str = "bench") -> list[Path]:
    """``<prefix>_throughput.png`` (images/s per configuration) and ``<prefix>_phases.png`` (phase
    split, stacked); [] when matplotlib is not installed."""
    from ijepa_fast.runtime.optional import available

    if not available("matplotlib"):
        return []
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = [r for r in result["rows"] if r.get("ok")]
    if not ok:
        return []
    title = (
        f"{result['meta']['spec']['model']}/{result['meta']['spec']['patch']} "
        f"{result['meta']['spec']['img']}px b{result['meta']['spec']['batch']} · {result['meta']['device']}"
    )
    names = [r["name"] for r in ok]
    paths = []

    fig = Figure(figsize=(8, 0.5 * len(ok) + 1.5))
    ax = fig.add_subplot()
    ips = [r["images_per_s"] for r in ok]
    bars = ax.barh(names, ips, color="tab:blue")
    for bar, r in zip(bars, ok):
        speedup = r.get("speedup_vs_authors")
        label = f"{r['images_per_s']:.1f}" + (f"  x{speedup:.2f}" if speedup else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + label, va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images/s")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, max(ips) * 1.3)
    fig.tight_layout()
    paths.append(out_dir / f"{prefix}_throughput.png")
    fig.savefig(paths[-1], dpi=110)

    phased = [r for r in ok if r.get("phases_ms")]
    if phased:
        fig = Figure(figsize=(8, 0.5 * len(phased) + 2))
        ax = fig.add_subplot()
        left = [0.0] * len(phased)
        for p in PHASES:
            vals = [r["phases_ms"].get(p, 0.0) for r in phased]
            if any(vals):
                ax.barh([r["name"] for r in phased], vals, left=left, label=p)
                left = [a + b for a, b in zip(left, vals)]
        ax.invert_yaxis()
        ax.set_xlabel("ms per step")
        ax.set_title("phase split · " + title, fontsize=9)
        ax.legend(
            fontsize=7,
            ncol=len(PHASES),
            loc="upper center",
            bbox_to_anchor=(0.5, -0.12 - 0.3 / len(phased)),
            frameon=False,
            handlelength=1.0,
            columnspacing=0.8,
        )
        paths.append(out_dir / f"{prefix}_phases.png")
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    return paths


def current_command(argv: list[str] | None = None) -> str:
    """The command line as typed (``argv``: the arguments given to ``main``, when not sys.argv's)."""
    argv = sys.argv[:] if argv is None else ["ijepa-bench", *argv]
    prog = Path(argv[0]).name if argv else "ijepa-bench"
    if prog in ("__main__.py", "bench.py"):
        prog = "python -m ijepa_fast.cli.bench"
    elif prog == "bench_step.py":
        prog = "python -m profiling.bench_step"
    return " ".join([prog, *(shlex.quote(a) for a in argv[1:])])


# ----------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = command_parser("ijepa-bench", __doc__.split("\n\n")[0] + "\n\n" + config_mod.describe())
    p.add_argument(
        "--config", default="", help="YAML config (ours or the authors'); default: ViT-H/14, 224 px, batch 128"
    )
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides for every row")
    p.add_argument(
        "--set",
        dest="more_overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="one more override",
    )
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (at least one per synthetic batch)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per configuration")
    p.add_argument("--phase-steps", type=int, default=5, help="phase-split steps per configuration (0: none)")
    p.add_argument("--batches", type=int, default=4, help="distinct synthetic micro-batches, used in turn")
    p.add_argument(
        "--loader", default="synthetic", choices=("synthetic", "pytorch", "dali"), help="real loaders read data.root"
    )
    p.add_argument("--ablation", action="store_true", help="authors, each switch alone, all on")
    p.add_argument(
        "--configs",
        nargs="+",
        default=None,
        metavar="NAME",
        help="run only these rows (names as in the table; 'authors', 'all on (default)', ...)",
    )
    p.add_argument("--compare-authors", action="store_true", help="the authors' preset and the default only")
    p.add_argument(
        "--compile-on-cpu",
        action="store_true",
        help="on a CPU, compile the default and keep --ablation's 'compile off' row",
    )
    p.add_argument("--out", default="", help="folder for <tag>.json and the PNG plots")
    p.add_argument(
        "--device-label",
        default="",
        help="name the device in the report (e.g. '2-core CPU (dev machine)'); default: the driver's name",
    )
    p.add_argument("--tag", default="", help="file name stem in --out (default: step_<model>_<patch>_<img>)")
    p.add_argument("--json", default="", help="JSON path (default: <out>/<tag>.json when --out is given)")
    p.add_argument(
        "--record",
        nargs="?",
        const="profiling/RESULTS.md",
        default=None,
        metavar="PATH",
        help="append the Markdown report to PATH (default profiling/RESULTS.md)",
    )
    p.add_argument(
        "--trace",
        default="",
        help="Chrome trace of phase-labelled steps of the default configuration "
        "(or of the last one run when the default is not among them); .json or .json.gz",
    )
    p.add_argument("--trace-steps", type=int, default=2)
    return p.parse_intermixed_args(argv)


def spec_from_args(args: argparse.Namespace) -> BenchSpec:
    return BenchSpec(
        config=args.config,
        overrides=[*args.overrides, *args.more_overrides],
        warmup=args.warmup,
        steps=args.steps,
        phase_steps=args.phase_steps,
        batches=args.batches,
        loader=args.loader,
        compile_on_cpu=args.compile_on_cpu,
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


def run_cli(argv: list[str] | None = None) -> dict:
    """The command line's work; returns the result (``main`` is the console entry point)."""
    args = parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    spec = spec_from_args(args)
    shape = spec.describe()
    device = resolve_device(shape["device"])
    configs = select_configs(args, device)
    tag = args.tag or f"step_{shape['model']}_{shape['patch']}_{shape['img']}"
    json_path = args.json or (str(Path(args.out) / f"{tag}.json") if args.out else "")

    def on_row(result: dict, row: dict) -> None:
        status = (
            f"{row['images_per_s']:.1f} images/s, step {row['step_ms_median']:.1f} ms"
            if row.get("ok")
            else f"failed: {row.get('error')}"
        )
        print(f"[ijepa-bench] {row['name']}: {status}", flush=True)
        if json_path:
            write_json(result, json_path)

    label = f"{shape['model']}/{shape['patch']} at {shape['img']} px, batch {shape['batch']}"
    accum = f" x {shape['grad_accum']} accumulation" if shape["grad_accum"] > 1 else ""
    print(f"[ijepa-bench] {label}{accum} on {device_name(device)}: {len(configs)} configuration(s)", flush=True)
    result = run(spec, configs, on_row, device_label=args.device_label, command=current_command(argv))
    report = markdown_report(result)
    if args.out:
        result["plots"] = [str(p) for p in write_plots(result, args.out, tag)]
    if json_path:
        write_json(result, json_path)
    if args.record:
        print(f"[ijepa-bench] appended to {record(result, args.record)}")
    print()
    print(report, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """``ijepa-bench``: exit status 0 when every configuration ran, 1 otherwise."""
    result = run_cli(argv)
    return 0 if all(r.get("ok") for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
