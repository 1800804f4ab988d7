"""How a step is timed: the optimizer step over a batch source, the plain step timer, the phase
clock, the Chrome trace, and the device's name and measured matmul ceiling.

- **Steps.** CUDA: one event per step boundary, a single sync at the end; step times are the
  differences (median, 20th and 80th percentiles), images/s is images over the wall time between
  a sync before and after the timed steps. CPU: ``time.perf_counter`` per step.
- **Phase split.** Further steps of the same ``TrainStep``, called with a phase clock as its
  ``mark`` callback (``PHASES``: data, target_fwd, context_fwd, predictor_fwd, backward,
  optimizer, ema, sync): CUDA events (no sync inside the step, so it runs as it does unsplit) or
  ``perf_counter`` on a CPU.
- **Trace.** A torch.profiler Chrome trace of phase-labelled steps (``.gz`` compresses).
"""

from __future__ import annotations

import gzip
import itertools
import math
import shutil
import statistics
import time
from pathlib import Path

import torch

from ijepa_fast.runtime.device import synchronize
from ijepa_fast.train.step import TrainStep

PHASES = ("data", "target_fwd", "context_fwd", "predictor_fwd", "backward", "optimizer", "ema", "sync")


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

    def phase(self, name: str) -> None:
        self._close_range()
        self.names.append(name)
        self.marks.append(_now(self.cuda))
        if self.label:
            self._range = torch.profiler.record_function(name)
            self._range.__enter__()

    def stop(self) -> None:
        self._close_range()
        self.marks.append(_now(self.cuda))

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
    """A time mark: a recorded CUDA event (read after a sync), else perf_counter."""
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
