"""run.dtype: which precision auto picks on each kind of device and why, with the capability probes
monkeypatched so every branch runs on any machine; the trainer's log line and the slow-bf16 warning."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pytest
import torch

from ijepa_fast import config as config_mod
from ijepa_fast.runtime import device as precision
from ijepa_fast.runtime.device import resolve_precision
from tests.test_trainer import tiny_overrides, write_idx

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Set what PyTorch reports about native bf16 on this CPU."""

    def set_native(native: bool) -> None:
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)

    return set_native


@pytest.fixture
def cuda_bf16(monkeypatch):
    def set_native(native: bool) -> None:
        monkeypatch.setattr(precision, "cuda_has_native_bf16", lambda device: native)

    return set_native


def test_auto_on_a_cpu_follows_native_bf16_support(cpu_bf16):
    cpu_bf16(False)
    p = resolve_precision(CPU, "auto")
    assert (p.name, p.autocast_dtype, p.slow) == ("fp32", None, False)
    assert p.reason.startswith("auto: this CPU has no native bf16")
    cpu_bf16(True)
    p = resolve_precision(CPU, "auto")
    assert (p.name, p.autocast_dtype, p.slow) == ("bf16", torch.bfloat16, False)
    assert "native bf16" in p.reason


def test_auto_on_cuda_follows_the_device(cuda_bf16, cpu_bf16):
    cpu_bf16(False)  # the CPU's answer must not matter on a CUDA device
    cuda_bf16(True)
    assert resolve_precision(CUDA, "auto").name == "bf16"
    cuda_bf16(False)
    p = resolve_precision(CUDA, "auto")
    assert p.name == "fp32" and "CUDA device has no native bf16" in p.reason


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_explicit_bf16_runs_everywhere_and_is_flagged_slow_without_native_support(device, cpu_bf16, cuda_bf16):
    for native in (True, False):
        cpu_bf16(native)
        cuda_bf16(native)
        p = resolve_precision(torch.device(device), "bf16")
        assert p.name == "bf16" and p.autocast_dtype == torch.bfloat16
        assert p.slow is (not native)
        assert ("much slower" in p.reason) is (not native)


def test_fp32_is_fp32_and_a_bad_value_names_the_option(cpu_bf16):
    cpu_bf16(True)
    assert resolve_precision(CPU, "fp32").autocast_dtype is None
    with pytest.raises(ValueError, match="--dtype='fp8'"):
        resolve_precision(CPU, "fp8", option="--dtype")


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of the given compute capability, as torch.cuda reports it (no GPU needed)."""

    def set_capability(capability: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        # torch's own rule: native bf16 from compute capability 8.0 (Ampere) on
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: capability >= (8, 0))

    return set_capability


@pytest.mark.parametrize("capability", [(6, 0), (7, 0), (7, 5), (8, 0), (8, 6), (9, 0), (10, 0)])
def test_auto_never_picks_fp16_and_fp16_asked_for_scales_its_loss(fake_gpu, capability):
    """V100 (7.0) and T4 (7.5) get fp32 from auto, with fp16 named as the option; Ampere and later bf16.
    fp16 is only ever what was asked for, and then comes with loss scaling."""
    fake_gpu(capability)
    auto = resolve_precision(CUDA, "auto")
    assert auto.name == ("bf16" if capability >= (8, 0) else "fp32") and not auto.loss_scaling
    if capability < (8, 0):
        assert "fp16 only when asked for" in auto.reason
    fp16 = resolve_precision(CUDA, "fp16")
    assert (fp16.name, fp16.autocast_dtype, fp16.loss_scaling, fp16.slow) == ("fp16", torch.float16, True, False)


def test_fp16_off_cuda_runs_flagged_slow(cpu_bf16):
    for native in (True, False):
        cpu_bf16(native)
        p = resolve_precision(CPU, "fp16")
        assert (p.name, p.autocast_dtype, p.loss_scaling, p.slow) == ("fp16", torch.float16, True, True)


def test_fp16_is_refused_with_deepspeed_in_one_line():
    from ijepa_fast.engines.deepspeed.config import deepspeed_config

    with pytest.raises(config_mod.ConfigError, match=r"^run.dtype=fp16 is not supported by the DeepSpeed engine"):
        config_mod.load(None, ["run.engine=deepspeed", "run.dtype=fp16"])
    cfg = config_mod.load(None, ["run.engine=auto", "run.dtype=fp16"])  # auto: DeepSpeed under a launcher
    with pytest.raises(config_mod.ConfigError, match=r"^run.dtype=fp16 is not supported by the DeepSpeed engine"):
        deepspeed_config(cfg, world_size=2)


def test_the_probe_asks_pytorch():
    """The real probe returns PyTorch's own oneDNN answer (whatever this machine is)."""
    assert precision.cpu_has_native_bf16() is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_the_demo_config_lets_the_device_decide():
    demo = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    assert config_mod.load(str(demo)).run.dtype == "auto"


def _trainer(tmp_path: Path, dtype: str):
    from ijepa_fast.train.trainer import Trainer

    data = write_idx(tmp_path / "data", n=16)
    extra = {"run.dtype": dtype, "optim.max_steps": 1, "data.batch_size": 2}
    overrides = tiny_overrides(data, tmp_path / "runs", dtype, **extra)
    return Trainer(config_mod.load(None, overrides))


def _precision_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("precision:")]


def test_the_trainer_logs_the_precision_and_why(tmp_path, caplog, cpu_bf16):
    cpu_bf16(False)
    with caplog.at_level(logging.INFO, logger="ijepa_fast"):
        trainer = _trainer(tmp_path, "auto")
    trainer.close()
    (record,) = _precision_records(caplog)
    assert record.levelno == logging.INFO
    assert record.getMessage().startswith("precision: fp32 (auto: this CPU has no native bf16")
    assert trainer.step_fn.amp_dtype is None


def test_explicit_bf16_on_a_cpu_without_it_trains_with_one_warning(tmp_path, caplog, cpu_bf16):
    cpu_bf16(False)
    with caplog.at_level(logging.INFO, logger="ijepa_fast"):
        trainer = _trainer(tmp_path, "bf16")
        result = trainer.fit()
    (record,) = _precision_records(caplog)
    assert record.levelno == logging.WARNING and "much slower than fp32" in record.getMessage()
    assert trainer.step_fn.amp_dtype == torch.bfloat16 and result.steps == 1
