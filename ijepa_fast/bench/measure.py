"""One configuration measured, and the run over all of them.

- **One configuration.** Each row builds the step ``ijepa-pretrain`` runs
  (``train.build.build_train_step``: models, attention backend, compile, engine, AdamW, schedules),
  times ``steps`` optimizer steps (each of ``optim.grad_accum`` micro-batches) after ``warmup``
  untimed ones (at least one per distinct batch, so ``torch.compile`` has met every mask shape),
  then the phase-split steps. An error (OOM, a missing backend) becomes the row's ``error``.
- **FLOPs and MFU.** ``ijepa_fast.models.flops`` per image for the mask sizes of the timed batches;
  achieved TFLOP/s = FLOPs per image * images/s; MFU against the device's dense bf16 peak
  (``paper.PEAK_BF16_TFLOPS``, by device name; n/a on a CPU) and, on CUDA, against a measured
  bf16 8192^3 matmul.
- **The run.** Every row in one process, the speed-up of each over ``authors`` and the GPU-hours
  projection, with the meta (device, date, commit, command) the report heads with.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from ijepa_fast.bench.paper import IMAGENET_TRAIN_IMAGES, peak_bf16_tflops, project
from ijepa_fast.bench.report import current_command, git_commit
from ijepa_fast.bench.sources import BenchConfig, BenchSpec, LoaderBatches, SyntheticBatches, default_config
from ijepa_fast.bench.timing import (
    device_name,
    measure_matmul_tflops,
    optimizer_step,
    percentiles,
    time_phases,
    time_steps,
    write_trace,
)
from ijepa_fast.config import Config
from ijepa_fast.models.flops import step_flops_for_masks
from ijepa_fast.models.vit import grid_size
from ijepa_fast.runtime.device import resolve_device, resolve_precision, synchronize
from ijepa_fast.runtime.distributed import detect
from ijepa_fast.train.build import build_train_step, start_process
from ijepa_fast.train.step import TrainStep


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
        if hasattr(source, "use"):  # synthetic batches hand what this row's loader would
            source.use(cfg.speed.uint8_input)
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
