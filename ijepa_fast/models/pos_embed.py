"""The ViT's fixed 2-D sin-cos position embeddings (the authors' layout) and their bicubic
resampling to another grid (Hugging Face IJepa's ``interpolate_pos_encoding``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_pos_embed_2d(embed_dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [grid*grid, embed_dim] in float64 (authors' layout).

    As the authors: the first half of the channels encodes the column index (their meshgrid's first
    output), the second half the row index; patches are in raster order (row-major).
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {embed_dim}")
    gh = np.arange(grid, dtype=np.float64)
    gw = np.arange(grid, dtype=np.float64)
    mesh = np.meshgrid(gw, gh)  # mesh[0]: column index w, mesh[1]: row index h; each (grid, grid)
    emb_a = _sincos_1d(embed_dim // 2, mesh[0].reshape(-1))
    emb_b = _sincos_1d(embed_dim // 2, mesh[1].reshape(-1))
    return np.concatenate([emb_a, emb_b], axis=1)  # (grid*grid, embed_dim)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = np.einsum("m,d->md", pos, omega)  # (P, dim/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (P, dim)


def interpolate_pos_embed(table: torch.Tensor, grid: int, size: tuple[int, int]) -> torch.Tensor:
    """A [1, grid*grid, D] position table for a grid of ``size`` = (rows, columns): [1, rows*cols, D].

    The table itself at the training grid; elsewhere resampled bicubically to the target size given
    as a size (not a scale factor, whose rounding can miss it by one), with ``align_corners=False``
    and no antialiasing: Hugging Face IJepa's ``interpolate_pos_encoding`` (after DINO's).
    """
    if size == (grid, grid):
        return table
    D = table.shape[-1]
    t = table.reshape(1, grid, grid, D).permute(0, 3, 1, 2)  # (1, D, grid, grid)
    t = F.interpolate(t, size=size, mode="bicubic", align_corners=False)  # (1, D, rows, cols)
    return t.permute(0, 2, 3, 1).reshape(1, size[0] * size[1], D)  # (1, rows*cols, D), raster order


def fixed_pos_embed(embed_dim: int, grid: int) -> nn.Parameter:
    table = torch.from_numpy(sincos_pos_embed_2d(embed_dim, grid)).float().unsqueeze(0)  # (1, N, D)
    return nn.Parameter(table, requires_grad=False)
