"""Multi-head self-attention with one backend dispatch shared by every block.

Backends (``speed.attention``): ``sdpa`` (torch.nn.functional.scaled_dot_product_attention:
FlashAttention-2, cuDNN or memory-efficient kernels on GPU), ``flash_attn`` (FlashAttention-3's
``flash_attn_interface`` on Hopper when installed and its kernels suit the head width, else
FlashAttention-2's ``flash_attn``), ``xformers`` (memory_efficient_attention), ``math`` (the
explicit softmax(QK^T)V reference, the authors' formulation) and ``auto``. ``resolve_backend``
turns the setting into the implementation that runs (``IMPLEMENTATIONS``), from the device, the
head width and the dtype the attention runs in. Each block binds that implementation's function
at construction, so its forward holds no import or package lookup (which would break a
``torch.compile`` graph). None of them returns the N x N attention matrix. Parameter names
(``qkv``, ``proj``) match the authors' checkpoints.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ijepa_fast.config.choices import ATTENTION_BACKENDS as BACKENDS
from ijepa_fast.runtime.optional import available, require

# What runs: flash_attn is FlashAttention-2 (package flash_attn), flash_attn3 FlashAttention-3
# (package flash_attn_interface, Hopper only).
IMPLEMENTATIONS = ("sdpa", "flash_attn", "flash_attn3", "xformers", "math")

# FlashAttention (2 and 3) takes fp16/bf16 only, head widths that are multiples of 8 up to 256.
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_ATTN_MAX_HEAD_DIM = 256
# The head widths each one has kernels for; a head between two runs the next wider kernel, its
# q, k, v padded to that width (the work grows with it). FlashAttention-3 has fewer: a ViT-H
# predictor's 24-wide heads run its 64-wide kernel, 2.7x the work, where FlashAttention-2 pads to 32.
_FA2_HEAD_DIMS = (32, 64, 96, 128, 160, 192, 224, 256)
_FA3_HEAD_DIMS = (64, 96, 128, 192, 256)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The authors' explicit attention, op for op (facebookresearch/ijepa at 52c1ae9,
    src/models/vision_transformer.py:143-147): softmax(q k^T * scale) v with the N x N matrix in
    memory. q, k, v: [B, H, N, Dh] -> [B, H, N, Dh]. Under CUDA's bf16 autocast the products run in
    bf16 and the softmax in fp32, as theirs do; without autocast everything runs in the inputs' dtype."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, N, N)
    return scores.softmax(dim=-1) @ v


def _tokens_major(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Run ``fn``, which takes and returns [B, N, H, Dh], on q, k, v [B, H, N, Dh]."""
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if isinstance(out, tuple):  # FlashAttention-3 releases that also return the log-sum-exp
        out = out[0]
    return out.transpose(1, 2)


def attention_function(impl: str) -> AttentionFn:
    """The function of implementation ``impl`` (one of ``IMPLEMENTATIONS``): q, k, v [B, H, N, Dh] -> [B, H, N, Dh].

    Imports the optional package it needs now (a clear error when it is missing).
    """
    if impl == "sdpa":
        return F.scaled_dot_product_attention
    if impl == "math":
        return attention_math
    if impl == "flash_attn":
        return functools.partial(_tokens_major, require("flash_attn", "attention backend 'flash_attn'").flash_attn_func)
    if impl == "flash_attn3":
        fa3 = require("flash_attn_interface", "attention backend 'flash_attn' (FlashAttention-3)")
        return functools.partial(_tokens_major, fa3.flash_attn_func)
    if impl == "xformers":
        xops = require("xformers", "attention backend 'xformers'")
        return functools.partial(_tokens_major, xops.memory_efficient_attention)
    raise ValueError(f"attention implementation {impl!r} is not one of {IMPLEMENTATIONS}")


def _flash_unfit(device: torch.device, head_dim: int, dtype: torch.dtype) -> str | None:
    """Why FlashAttention cannot serve these inputs, or None when it can."""
    if device.type != "cuda":
        return f"it runs only on CUDA devices, not on {device.type}"
    if dtype not in _FLASH_DTYPES:
        return f"it takes fp16/bf16 only, and attention runs in {dtype} here (run.dtype=fp32?)"
    if head_dim % 8 or head_dim > _FLASH_ATTN_MAX_HEAD_DIM:
        return f"it needs a head width that is a multiple of 8 up to {_FLASH_ATTN_MAX_HEAD_DIM}, not {head_dim}"
    return None


def padded_head_dim(head_dim: int, kernel_dims: tuple[int, ...]) -> int:
    """The head width a FlashAttention kernel computes for heads of ``head_dim``."""
    return next(d for d in kernel_dims if d >= head_dim)


def _installed_flash(device: torch.device, head_dim: int, requested: bool) -> str | None:
    """The FlashAttention that suits heads of ``head_dim`` on ``device``, among those installed:
    FA3 on Hopper unless it pads the heads wider than FA2 would (then FA2, which needs Ampere or
    newer); for ``auto`` (``requested`` False) nothing rather than FA3's wider padding, for an
    explicit ``flash_attn`` FA3 all the same when FA2 is not installed."""
    major, _ = torch.cuda.get_device_capability(device)
    fa3 = major == 9 and available("flash_attn_interface")
    fa2 = major >= 8 and available("flash_attn")
    fa3_suits = padded_head_dim(head_dim, _FA3_HEAD_DIMS) <= padded_head_dim(head_dim, _FA2_HEAD_DIMS)
    if fa3 and fa3_suits:
        return "flash_attn3"
    if fa2:
        return "flash_attn"
    return "flash_attn3" if fa3 and requested else None


def resolve_backend(requested: str, device: torch.device | str, head_dim: int, dtype: torch.dtype) -> str:
    """The implementation that runs for ``speed.attention=requested`` (one of ``IMPLEMENTATIONS``), for
    attention on ``device`` with heads of ``head_dim`` computed in ``dtype`` (the autocast dtype, or
    the weights'). A requested backend that cannot serve is an error saying why.

    ``auto``: FlashAttention when it can serve and is installed (FA3 on Hopper, else FA2; FA2, or
    else sdpa, where FA3 would pad the heads wider than FA2: ``_installed_flash``), otherwise sdpa
    (on CUDA it dispatches to FlashAttention-2 / cuDNN itself).
    """
    if requested not in BACKENDS:
        raise ValueError(f"attention={requested!r} is not a backend: choose one of {BACKENDS}")
    dev = torch.device(device)
    if requested == "auto":
        flash = None if _flash_unfit(dev, head_dim, dtype) else _installed_flash(dev, head_dim, requested=False)
        return flash or "sdpa"
    if requested == "flash_attn":
        return _require_flash(dev, head_dim, dtype)
    if requested == "xformers":
        require("xformers", "attention backend 'xformers'")
        if dev.type != "cuda":
            raise ValueError(f"attention backend 'xformers' runs only on CUDA devices, not on {dev.type}")
    return requested


def _require_flash(device: torch.device, head_dim: int, dtype: torch.dtype) -> str:
    why = _flash_unfit(device, head_dim, dtype)
    if why is not None:
        raise ValueError(f"attention backend 'flash_attn' cannot serve: {why}; use attention=sdpa")
    flash = _installed_flash(device, head_dim, requested=True)
    if flash is None:
        require("flash_attn", "attention backend 'flash_attn'")  # raises when missing, naming the install
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise ValueError(
            f"attention backend 'flash_attn' (FlashAttention-2) needs an Ampere or newer GPU (capability "
            f"8.0+), this one has {capability}; use attention=sdpa"
        )
    return flash


class Attention(nn.Module):
    """Pre-projected multi-head self-attention: x [B, N, D] -> [B, N, D]."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = backend

    @property
    def backend(self) -> str:
        """The implementation that runs (one of ``IMPLEMENTATIONS``); setting it binds its function."""
        return self._backend

    @backend.setter
    def backend(self, impl: str) -> None:
        self._attend = attention_function(impl)
        self._backend = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
        out = self._attend(qkv[0], qkv[1], qkv[2])  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))
