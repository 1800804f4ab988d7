"""Which device a run uses, and at which autocast precision (``run.dtype``, ``--dtype``) and why.

``auto`` takes bf16 autocast where the device computes bf16 natively: a CUDA device that PyTorch
says supports it (compute capability 8.0 or newer), or a CPU where PyTorch's oneDNN check passes
(AVX512 or AMX). Anywhere else it takes fp32: without native support bf16 matmuls take a slow
path, many times slower than fp32 ones. ``bf16`` asked for explicitly on such a device still runs,
flagged ``slow`` so the caller can warn. ``fp32`` is plain fp32.

``fp16`` (fp16 autocast with loss scaling: ``Precision.loss_scaling``) is for CUDA GPUs without bf16
(V100, T4) and is taken only when asked for: ``auto`` never picks it, as it changes the training
numerics (a GradScaler skips the steps whose gradients overflow). On a device other than CUDA it
runs (the tests use it on the CPU), flagged ``slow``.

    p = resolve_precision(torch.device("cpu"), "auto")
    p.name, p.reason, p.slow   # "fp32", "auto: this CPU has no native bf16 (...)", False
    with autocast(device, p.autocast_dtype): ...
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ijepa_fast.config.choices import DTYPES
from ijepa_fast.config.options import check_device


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16" | "fp16" | "fp32"
    reason: str  # why, for the log
    slow: bool = False  # bf16 without native bf16, or fp16 off CUDA: runs, but expect it slower than fp32

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for plain fp32."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    @property
    def loss_scaling(self) -> bool:
        """fp16's narrow range needs a loss scaler (a GradScaler) so small gradients do not flush to 0."""
        return self.name == "fp16"

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def cpu_capability() -> str:
    """The vector ISA PyTorch dispatches to on this CPU ("AVX2", "AVX512", ...)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # an unusual build: the capability is only for the message
        return "unknown"


def cpu_has_native_bf16() -> bool:
    """PyTorch's own answer: oneDNN runs bf16 natively here (AVX512 or AMX on x86)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def cuda_has_native_bf16(device: torch.device) -> bool:
    """True on a CUDA device that computes bf16 natively (emulation does not count)."""
    if not torch.cuda.is_available():
        return False
    with torch.cuda.device(device.index if device.index is not None else torch.cuda.current_device()):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def _native_bf16(device: torch.device) -> tuple[bool, str]:
    """(native bf16 on ``device``, the reason in words)."""
    if device.type == "cuda":
        if cuda_has_native_bf16(device):
            return True, "this CUDA device has native bf16"
        return False, "this CUDA device has no native bf16 (compute capability below 8.0; fp16 only when asked for)"
    if device.type == "cpu":
        if cpu_has_native_bf16():
            return True, f"PyTorch reports native bf16 on this CPU ({cpu_capability()})"
        needs = "PyTorch's oneDNN check needs AVX512 or AMX"
        return False, f"this CPU has no native bf16 ({needs}; this CPU: {cpu_capability()})"
    return False, f"no bf16 check for {device.type} devices"


def resolve_device(name: str, option: str = "run.device") -> torch.device:
    """``auto`` -> CUDA when available, else the CPU; a bad name, or CUDA without CUDA, names ``option``."""
    check_device(option, name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option}={name!r} but no CUDA device is available; use {option}=cpu")
    return dev


def resolve_precision(device: torch.device | str, dtype: str, option: str = "run.dtype") -> Precision:
    """The precision ``dtype`` (auto|bf16|fp16|fp32) means on ``device``, with its reason."""
    if dtype not in DTYPES:
        raise ValueError(f"{option}={dtype!r}: choose one of {', '.join(DTYPES)}")
    if dtype == "fp32":
        return Precision("fp32", f"{option}=fp32")
    if dtype == "fp16":
        if torch.device(device).type == "cuda":
            return Precision("fp16", f"{option}=fp16, with loss scaling")
        return Precision("fp16", f"{option}=fp16 is meant for CUDA GPUs without bf16: expect it to be slow", slow=True)
    native, why = _native_bf16(torch.device(device))
    if dtype == "bf16":
        if native:
            return Precision("bf16", f"{option}=bf16")
        return Precision("bf16", f"{option}=bf16, but {why}: expect it to be much slower than fp32", slow=True)
    return Precision("bf16" if native else "fp32", f"auto: {why}")


def synchronize(device: torch.device) -> None:
    """Wait until everything queued on ``device`` has run (the CPU queues nothing: a no-op there)."""
    torch.get_device_module(device).synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or no context for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
