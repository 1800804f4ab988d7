"""What every kernel file shares (kernels/_dispatch.py): lazy jitting and the launch on the tensors' device."""

from __future__ import annotations

import contextlib

import pytest
import torch

import ijepa_fast.kernels.ema as ema
import ijepa_fast.kernels.masked_gather as mg
import ijepa_fast.kernels.target_norm_gather as tng
from ijepa_fast.kernels import _dispatch as dsp
from ijepa_fast.kernels.inputs import make_ema_inputs, make_gather_inputs


def test_lazy_jit_builds_on_first_call_once_per_interpreter_setting(monkeypatch):
    builds = []

    @dsp.lazy_jit
    def kernels():
        builds.append(dsp.interpret_mode())
        return object()

    assert builds == []  # decorating builds nothing
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    first = kernels()
    assert kernels() is first and builds == [True]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert kernels() is not first and builds == [True, False]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels() is first and builds == [True, False]


def test_on_device_makes_the_tensors_cuda_device_current():
    guard = dsp.on_device(torch.device("cuda", 1))  # built, not entered: no CUDA needed
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with dsp.on_device(torch.device("cpu")):  # the interpreter: nothing to switch
        pass


class _Recorder:
    """Wraps a jitted kernel; notes which device guards are open when it launches."""

    def __init__(self, name: str, kernel, open_guards: list, launches: list):
        self.name, self.kernel, self.open_guards, self.launches = name, kernel, open_guards, launches

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append((self.name, list(self.open_guards)))
            return self.kernel[grid](*args, **kwargs)

        return run


def test_every_launch_runs_under_its_inputs_device_guard(triton_path, monkeypatch):
    """Triton launches on the current CUDA device; each launcher must first make its tensors' device current."""
    open_guards, launches = [], []

    @contextlib.contextmanager
    def recording_guard(device):
        open_guards.append(device)
        try:
            yield
        finally:
            open_guards.pop()

    def wrap(name, kernel):
        return _Recorder(name, kernel, open_guards, launches)

    monkeypatch.setattr(dsp, "on_device", recording_guard)
    gather_add, segment_sum = mg._kernels()
    monkeypatch.setattr(mg, "_kernels", lambda: (wrap("gather_add", gather_add), wrap("segment_sum", segment_sum)))
    norm_gather, ema_kernel = tng._kernel(), ema._kernel()
    monkeypatch.setattr(tng, "_kernel", lambda: wrap("norm_gather", norm_gather))
    monkeypatch.setattr(ema, "_kernel", lambda: wrap("ema", ema_kernel))

    t = make_gather_inputs(2, 5, 3, 2, 2, pos_grad=False)
    mg.masked_gather_add(t["x"], t["pos"], t["idx"]).sum().backward()
    tng.target_norm_gather(t["x"].detach(), t["idx"])
    ts, ss, _ = make_ema_inputs([(4,), (3, 2)])
    ema.ema_update_(ts, ss, 0.9)
    on_cpu = [torch.device("cpu")]
    assert launches == [("gather_add", on_cpu), ("segment_sum", on_cpu), ("norm_gather", on_cpu), ("ema", on_cpu)]


@pytest.mark.gpu
def test_kernels_run_on_a_device_that_is_not_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    torch.cuda.set_device(0)
    t = make_gather_inputs(3, 7, 123, 2, 4, device="cuda:1", seed=1)
    out = mg.masked_gather_add(t["x"], t["pos"], t["idx"])
    torch.testing.assert_close(out, mg.masked_gather_add_reference(t["x"], t["pos"], t["idx"]), rtol=0, atol=0)
    ts, ss, _ = make_ema_inputs([(1000,), (7, 3)], device="cuda:1")
    want = [0.9 * a + 0.1 * b for a, b in zip(ts, ss)]
    ema.ema_update_(ts, ss, 0.9)
    for got, w in zip(ts, want):
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-6)
