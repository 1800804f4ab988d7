"""Inputs for the kernels, built the same way by their tests, their benchmarks and the ahead-of-time compiles.

Plain torch only (no pytest), so the benchmarks run where only torch and triton are installed.
"""

from __future__ import annotations

import torch

# Token-gather shapes (B, N, D, M, K = target tokens per block, K_ctx = context tokens, D_pred =
# predictor width). vith14: ViT-H/14 at 224 px, batch 128, the mean mask sizes of the multi-block
# sampler. odd: no size divisible by 16 (so Triton specialises none of them). tiny: the CPU benchmark.
GATHER_SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"B": 2, "N": 16, "D": 32, "M": 4, "K": 3, "K_ctx": 5, "D_pred": 16},
    "vith14": {"B": 128, "N": 256, "D": 1280, "M": 4, "K": 43, "K_ctx": 72, "D_pred": 384},
    "odd": {"B": 3, "N": 7, "D": 123, "M": 2, "K": 3, "K_ctx": 5, "D_pred": 37},
}

# Encoder sizes whose parameters the EMA benchmark updates (arguments of ``vit_param_shapes``).
VIT_PARAM_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"depth": 2, "width": 32, "patch": 4, "grid": 4},
    "vith14": {"depth": 32, "width": 1280, "patch": 14, "grid": 16},
}


def vit_param_shapes(
    depth: int, width: int, patch: int, grid: int, mlp_ratio: int = 4, in_chans: int = 3
) -> list[tuple]:
    """Parameter shapes of the I-JEPA ViT encoder, in ``parameters()`` order (pos_embed included)."""
    D, H = width, width * mlp_ratio
    shapes = [(1, grid * grid, D), (D, in_chans, patch, patch), (D,)]  # pos_embed, patch_embed
    block = [(D,), (D,), (3 * D, D), (3 * D,), (D, D), (D,), (D,), (D,), (H, D), (H,), (D, H), (D,)]
    return shapes + block * depth + [(D,), (D,)]  # ..., final norm


def make_ema_inputs(
    shapes: list[tuple],
    t_dtype=torch.float32,
    s_dtype=torch.float32,
    device="cpu",
    seed: int = 0,
    bf16_out: bool = False,
):
    """targets, sources (random, of ``shapes``) and the bf16 copies to fill (or None)."""
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(s, generator=g).to(device=device, dtype=t_dtype) for s in shapes]
    ss = [torch.randn(s, generator=g).to(device=device, dtype=s_dtype) for s in shapes]
    outs = [torch.full(s, float("nan"), dtype=torch.bfloat16, device=device) for s in shapes] if bf16_out else None
    return ts, ss, outs


def patch_layout(tokens: torch.Tensor) -> torch.Tensor:
    """The values of ``tokens`` [B, N, D] laid out as a convolution gives them on NCHW images: a view
    of a contiguous [B, D, N] (strides N*D, 1, N), as ``conv(images).flatten(2).transpose(1, 2)``
    gives (PatchEmbed runs its convolution channels-last instead; the kernels read either in place)."""
    return tokens.transpose(1, 2).contiguous().transpose(1, 2)


def make_gather_inputs(
    B: int,
    N: int,
    D: int,
    M: int,
    K: int,
    dtype=torch.float32,
    device="cpu",
    seed: int = 0,
    unique: bool = False,
    pos_batch: int = 1,
    pos_grad: bool = True,
    patch_strides: bool = False,
) -> dict:
    """x [B, N, D], pos [pos_batch, N, D], mask_token [1, 1, D] (float, requiring grad) and idx [M, B, K].

    ``unique=False`` draws indices with replacement: duplicates inside and across blocks, the hard
    case for the backward. ``unique=True`` draws sorted distinct indices per block, as the masks do.
    ``patch_strides=True`` lays x out as a transposed view (see ``patch_layout``); it stays a leaf.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g).to(device=device, dtype=dtype)
    x = (patch_layout(x) if patch_strides else x).requires_grad_()
    pos = torch.randn(pos_batch, N, D, generator=g).to(device=device, dtype=dtype).requires_grad_(pos_grad)
    mask_token = torch.randn(1, 1, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    if unique:
        idx = torch.rand(M, B, N, generator=g).argsort(-1)[..., :K].sort(-1).values
    else:
        idx = torch.randint(0, N, (M, B, K), generator=g)
    return {"x": x, "pos": pos, "mask_token": mask_token, "idx": idx.to(device)}
