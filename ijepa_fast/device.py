"""Which device a run uses and at what precision."""

from __future__ import annotations

import torch

DTYPES = ("auto", "bf16", "fp32")


def resolve_device(name: str, option: str = "run.device") -> torch.device:
    """``auto`` -> CUDA when available, else the CPU; a CUDA device without CUDA names ``option``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option}={name!r} but no CUDA device is available; use {option}=cpu")
    return dev


def autocast_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """bf16 autocast on CUDA ('auto' or 'bf16'), none (fp32) on CPU unless 'bf16' is asked for."""
    if dtype == "fp32" or (dtype == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16
