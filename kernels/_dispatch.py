"""What the kernels in this folder share: lazy jitting, the launch, the Triton-or-reference decision
and input checks.

Dispatch rule (read at call time, never at import):
- CUDA tensors run the Triton kernel when Triton imports, else the plain-PyTorch reference (with a
  warning once, since that is a silent slow-down otherwise);
- CPU tensors run the reference, unless ``TRITON_INTERPRET=1`` is set in the environment, which
  forces the Triton kernel through Triton's interpreter (how the CPU tests exercise the kernels).

Range checks on indices cost a host sync on a GPU, so the Triton path does them only under the
debug switch: ``debug=True`` on the call or ``IJEPA_FAST_DEBUG=1`` in the environment. The reference
path always does them.

Every launch goes through ``launch``, which makes the tensors' CUDA device current first: Triton
launches on the current device and its current stream, whatever device the tensors are on.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

import torch

from ijepa_fast.runtime.optional import available, require

INDEX_DTYPES = (torch.int32, torch.int64)
T = TypeVar("T")


def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_module() -> ModuleType:
    """The imported ``triton`` package, or a clear error naming what to install."""
    return require("triton", "the Triton kernels in kernels/")


def lazy_jit(build: Callable[[], T]) -> Callable[[], T]:
    """Decorator for the function that defines a file's ``@triton.jit`` kernels and returns them.

    The kernels are built on first call, so importing a kernel file imports no triton, and built
    once per ``TRITON_INTERPRET`` setting, because ``triton.jit`` reads that setting when it decorates.
    """
    built = functools.cache(lambda interpret: build())

    @functools.wraps(build)
    def kernels() -> T:
        return built(interpret_mode())

    return kernels


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` the current CUDA device for the block (a no-op off CUDA, e.g. the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)  # cheap when it is already current
    return contextlib.nullcontext()


def launch(kernel, grid: tuple[int, ...], device: torch.device, *args, **constexprs) -> None:
    """``kernel[grid](*args, **constexprs)`` on ``device``, the device of the tensors it reads and writes."""
    with on_device(device):
        kernel[grid](*args, **constexprs)


@functools.cache
def _warn_no_triton() -> None:
    warnings.warn(
        "triton is not installed: the fused kernels fall back to their plain-PyTorch references "
        "on CUDA (correct, but slower). Install it with: pip install triton",
        stacklevel=3,
    )


def use_triton(device: torch.device) -> bool:
    """Whether a call on ``device`` takes the Triton kernel (see the module docstring)."""
    if device.type == "cuda":
        if available("triton"):
            return True
        _warn_no_triton()
        return False
    return interpret_mode() and available("triton")


def debug_enabled(flag: bool = False) -> bool:
    """Range checks in the Triton path: asked for on the call or by ``IJEPA_FAST_DEBUG=1``."""
    return bool(flag) or os.environ.get("IJEPA_FAST_DEBUG", "0") == "1"


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (and >= 1): Triton block shapes must be powers of two."""
    return 1 << max(0, (int(n) - 1).bit_length())


def check_tensor(t: object, name: str, dims: int) -> torch.Tensor:
    """``t`` must be a floating-point tensor with ``dims`` dimensions."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


def check_index(idx: object, name: str, batch: int, device: torch.device) -> torch.Tensor:
    """Mask indices [B, K] or [M, B, K] (int64 or int32, on ``device``) -> [M, B, K]."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token indices, got {type(idx).__name__}")
    if idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int64 or int32, got {idx.dtype}")
    if idx.dim() == 2:
        idx = idx.unsqueeze(0)  # (1, B, K): one block
    if idx.dim() != 3:
        raise ValueError(f"{name} must be [B, K] or [M, B, K], got shape {tuple(idx.shape)}")
    if idx.size(1) != batch:
        raise ValueError(f"{name} has batch size {idx.size(1)} (shape {tuple(idx.shape)}) but the tokens have {batch}")
    check_device(idx, name, device)
    return idx


def check_device(t: torch.Tensor, name: str, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


def check_range(idx: torch.Tensor, n: int, name: str = "idx") -> None:
    """Raise IndexError when an index lies outside [0, n). One host sync (aminmax)."""
    if idx.numel() == 0:
        return
    lo, hi = torch.aminmax(idx)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= n:
        raise IndexError(f"{name} has values outside [0, {n}): min {lo}, max {hi}")
