"""Multi-head self-attention with one backend dispatch shared by every block.

Backends: ``sdpa`` (torch.nn.functional.scaled_dot_product_attention: FlashAttention-2, cuDNN or
memory-efficient kernels on GPU), ``flash_attn`` (flash_attn_func, FA2/FA3), ``xformers``
(memory_efficient_attention) and ``math`` (the explicit softmax(QK^T)V reference, the authors'
formulation). None of them returns the N x N attention matrix. Parameter names (``qkv``, ``proj``)
match the authors' checkpoints whatever the backend.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ijepa_fast.optional import available, require

BACKENDS = ("auto", "sdpa", "flash_attn", "xformers", "math")

# flash_attn's kernels take head widths that are multiples of 8 up to 256 (FA2) in fp16/bf16 only.
_FLASH_ATTN_MAX_HEAD_DIM = 256


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention. q, k, v: [B, H, N, Dh] -> [B, H, N, Dh]; softmax in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, N, N)
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def _attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _attention_flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    flash_attn = require("flash_attn", "attention backend 'flash_attn'")
    # flash_attn wants (B, N, H, Dh)
    out = flash_attn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _attention_xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    require("xformers", "attention backend 'xformers'")
    import xformers.ops as xops

    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


_IMPLS = {
    "sdpa": _attention_sdpa,
    "flash_attn": _attention_flash_attn,
    "xformers": _attention_xformers,
    "math": attention_math,
}


def resolve_backend(requested: str, device: torch.device | str, head_dim: int) -> str:
    """Pick the backend to use; a requested backend that cannot serve is an error saying why.

    ``auto``: sdpa everywhere (on CUDA it dispatches to FlashAttention-2 / cuDNN itself), except
    flash_attn when it is installed and the device is CUDA (FA3 on Hopper is faster than SDPA's FA2).
    """
    if requested not in BACKENDS:
        raise ValueError(f"attention={requested!r} is not a backend: choose one of {BACKENDS}")
    dev = torch.device(device)
    if requested == "auto":
        flash_ok = head_dim % 8 == 0 and head_dim <= _FLASH_ATTN_MAX_HEAD_DIM
        if dev.type == "cuda" and available("flash_attn") and flash_ok:
            return "flash_attn"
        return "sdpa"
    if requested in ("flash_attn", "xformers"):
        require(requested, f"attention backend '{requested}'")
        if dev.type != "cuda":
            raise ValueError(f"attention backend '{requested}' runs only on CUDA devices, not on {dev.type}")
        if requested == "flash_attn" and (head_dim % 8 or head_dim > _FLASH_ATTN_MAX_HEAD_DIM):
            raise ValueError(
                f"attention backend 'flash_attn' cannot serve head width {head_dim}: it needs a multiple "
                f"of 8 up to {_FLASH_ATTN_MAX_HEAD_DIM}; use attention=sdpa"
            )
    return requested


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
        out = _IMPLS[self.backend](qkv[0], qkv[1], qkv[2])  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))
