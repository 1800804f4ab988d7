"""Token gathers used by the encoder, the predictor and the loss, with the authors' layout.

Layout (the authors' ``apply_masks``): x [B, N, D] and indices [M, B, K] give [M*B, K, D] with
``out[m*B + b, k] = x[b, idx[m, b, k]]``; a 2-D index [B, K] is one block (M = 1).

``fused=True`` uses the kernels in ``kernels/`` (Triton on CUDA, their plain-PyTorch reference on
CPU); ``fused=False`` is the authors' method (expand the indices to [B, K, D], gather, concatenate),
kept so the profiler can measure what the kernels buy.
"""

from __future__ import annotations

import torch

from ijepa_fast.kernels.masked_gather import mask_tokens, masked_gather, masked_gather_add
from ijepa_fast.kernels.target_norm_gather import target_norm_gather


def as_blocks(idx: torch.Tensor) -> torch.Tensor:
    """[B, K] -> [1, B, K]; [M, B, K] unchanged."""
    if idx.dim() == 2:
        return idx.unsqueeze(0)
    if idx.dim() != 3:
        raise ValueError(f"mask indices must be [B, K] or [M, B, K], got shape {tuple(idx.shape)}")
    return idx


def apply_masks_authors(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The authors' gather (``apply_masks``, facebookresearch/ijepa src/masks/utils.py:11-20): expand
    each block's indices to [B, K, D], gather, cat over blocks."""
    out = []
    for block in as_blocks(idx):  # (B, K)
        out.append(torch.gather(x, 1, block.unsqueeze(-1).expand(-1, -1, x.size(-1))))
    return torch.cat(out, dim=0)  # (M*B, K, D)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """x [B, N, D], idx [B, K] or [M, B, K] -> [M*B, K, D]."""
    return masked_gather(x, as_blocks(idx)) if fused else apply_masks_authors(x, idx)


def gather_tokens_with_pos(x: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """(x + pos)[idx]: x [B, N, D], pos [1, N, D], idx [B, K] or [M, B, K] -> [M*B, K, D]."""
    if fused:
        return masked_gather_add(x, pos, as_blocks(idx))
    return apply_masks_authors(x + pos, idx)


def predictor_mask_tokens(
    mask_token: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor, fused: bool = True
) -> torch.Tensor:
    """mask_token [1, 1, D] + pos[idx]: pos [1, N, D], idx [M, B, K] -> [M*B, K, D]."""
    idx = as_blocks(idx)
    if fused:
        return mask_tokens(mask_token, pos, idx)
    _, B, _ = idx.shape
    pos_b = pos.expand(B, -1, -1)  # (B, N, D)
    return apply_masks_authors(pos_b, idx) + mask_token


TARGET_NORM_EPS = 1e-5  # F.layer_norm's default, as the authors normalise the targets


def normalized_targets(
    h: torch.Tensor, idx: torch.Tensor, fused: bool = True, eps: float = TARGET_NORM_EPS
) -> torch.Tensor:
    """LayerNorm (no affine) of h [B, N, D] at the target rows idx [M, B, K] -> [M*B, K, D].

    The authors normalise all N tokens with F.layer_norm (default eps 1e-5) and gather after; the
    fused kernel normalises only the gathered rows.
    """
    if fused:
        return target_norm_gather(h, as_blocks(idx), eps=eps)
    h = torch.nn.functional.layer_norm(h, (h.size(-1),), eps=eps)
    return apply_masks_authors(h, idx)
