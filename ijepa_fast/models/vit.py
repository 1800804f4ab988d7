"""ViT encoder and I-JEPA predictor with the authors' parameter names, shapes and initialisation.

State dicts load the authors' released ``encoder`` / ``target_encoder`` / ``predictor`` weights
(``module.`` prefix stripped) with ``strict=True``. Position embeddings are fixed 2-D sin-cos
buffers stored as non-trainable parameters (as the authors do, so their checkpoints carry them).
The encoder runs images of any size that is a multiple of its patch: away from the training grid,
its position table is resampled bicubically (``interpolate_pos_embed``, as Hugging Face's IJepa
with ``interpolate_pos_encoding=True``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ijepa_fast.models import ops
from ijepa_fast.models.attention import Attention
from ijepa_fast.models.pos_embed import fixed_pos_embed, interpolate_pos_embed


@dataclass(frozen=True)
class ViTSize:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


# The paper's widths, depths and heads; ViT-G uses MLP ratio 48/11 (hidden 6144).
VIT_SIZES: dict[str, ViTSize] = {
    "vit_tiny": ViTSize(192, 12, 3),
    "vit_small": ViTSize(384, 12, 6),
    "vit_base": ViTSize(768, 12, 12),
    "vit_large": ViTSize(1024, 24, 16),
    "vit_huge": ViTSize(1280, 32, 16),
    "vit_giant": ViTSize(1408, 40, 16, 48 / 11),
}


def vit_size(name: str) -> ViTSize:
    if name not in VIT_SIZES:
        raise ValueError(f"unknown model name {name!r}: choose one of {list(VIT_SIZES)}")
    return VIT_SIZES[name]


def grid_size(img_size: int, patch_size: int) -> int:
    """Patches per side; the image size must be a multiple of the patch size."""
    if patch_size < 1 or img_size < 1:
        raise ValueError(f"image size {img_size} and patch size {patch_size} must be positive")
    if img_size % patch_size:
        raise ValueError(
            f"patch size {patch_size} does not divide the image size {img_size} "
            f"(choose an image size that is a multiple of {patch_size})"
        )
    return img_size // patch_size


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: in training, zero a residual branch [B, ...] per sample with probability
    ``rate`` and scale the kept ones by 1 / (1 - rate), so its expectation is unchanged."""
    if rate == 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype).bernoulli_(1 - rate)
    return x * keep.div_(1 - rate)


class StreamLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state dict); with ``keep_dtype`` (``speed.bf16_residual``)
    the output takes the input's dtype: bf16 in, bf16 out, statistics and affine in fp32.

    The bf16 output is the fp32 result rounded once, which is what the fp32 path's next bf16 matmul
    reads anyway: only the residual stream's own rounding changes the function. Eagerly it costs an
    fp32 temporary; compiled, Inductor fuses the upcast, the norm and the downcast into one kernel.
    """

    keep_dtype: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.keep_dtype or x.dtype == torch.float32:
            return super().forward(x)
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)); each branch dropped
    per sample with probability ``drop_path`` in training (0 in pretraining; ``set_drop_path``).

    The residual adds run in the stream's dtype: fp32 when the stream is fp32 (the authors'), bf16
    with ``speed.bf16_residual`` (its norms then return bf16)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attention: str = "sdpa"):
        super().__init__()
        self.norm1 = StreamLayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True, backend=attention)
        self.norm2 = StreamLayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop_path = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def set_drop_path(blocks: nn.ModuleList, rate: float) -> list[float]:
    """Stochastic depth rising linearly over the blocks, 0 for the first to ``rate`` for the last
    (as in DeiT and the MAE fine-tuning recipe); returns the rates."""
    rates = [rate * i / max(1, len(blocks) - 1) for i in range(len(blocks))]
    for blk, r in zip(blocks, rates):
        blk.drop_path = r
    return rates


class PatchEmbed(nn.Module):
    """[B, 3, H, W] -> [B, N, D] with a stride-p convolution, the tokens contiguous.

    The convolution runs on channels-last images, so its output [B, D, h, w] is channels-last and
    the tokens are a contiguous [B, N, D] with no copy: the gathers that read them load each token's
    D features 16 bytes at a time. (On the images' own layout, the tokens would be a transposed view
    with features N elements apart, read 2 or 4 bytes at a time.) The values are the same."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x.contiguous(memory_format=torch.channels_last))  # (B, D, h, w), channels-last
        return x.flatten(2).transpose(1, 2)  # (B, N, D), contiguous


def _init_weights(module: nn.Module, std: float) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _rescale_blocks(blocks: nn.ModuleList) -> None:
    """Divide each block's output projections by sqrt(2 * layer_index), layer_index from 1.

    Only with ``depth_scaled_init``. The authors' model classes do this in their constructors, but
    their training builds the models through ``init_model`` (src/helper.py), which then redraws every
    Linear at std 0.02 with zero biases: their runs, and the paper's numbers, start without it. So
    the default here is their training's init, and the rescale is the option."""
    with torch.no_grad():
        for i, blk in enumerate(blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * i))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * i))


class _BlockStack(nn.Module):
    """Shared block-running logic: optional activation checkpointing per block, and the residual
    stream's dtype (``set_bf16_residual``)."""

    activation_checkpointing: bool = False
    bf16_residual: bool = False

    def set_bf16_residual(self, on: bool) -> None:
        """``speed.bf16_residual``: the fixed position embeddings and the mask token join the stream
        in the dtype of the tokens they are added to (bf16 under bf16 autocast, where fp32 ones would
        promote the whole stream to fp32), and every LayerNorm returns its input's dtype. Without
        autocast the stream is fp32 either way and nothing changes."""
        self.bf16_residual = on
        for m in self.modules():
            if isinstance(m, StreamLayerNorm):
                m.keep_dtype = on

    def _in_stream(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``t`` in the dtype of the stream ``x`` with ``bf16_residual``; else ``t`` (it promotes)."""
        return t.to(x.dtype) if self.bf16_residual else t

    def _run_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            x = self._run_block(blk, x)
        return x

    def set_attention_backend(self, backend: str) -> None:
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = backend


class VisionTransformer(_BlockStack):
    """I-JEPA context / target encoder.

    forward(images [B, 3, H, W], context_idx [B, K] or None) -> [B, K or N, D]: the final-LayerNorm
    tokens, only those at ``context_idx`` when given (the tokens are dropped before the blocks).
    H and W are multiples of the patch; N = (H/p)(W/p). ``forward_layers`` is the same pass, keeping
    the last blocks' tokens too.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        init_std: float = 0.02,
        attention: str = "sdpa",
        fused_gather: bool = True,
        depth_scaled_init: bool = False,
    ):
        super().__init__()
        self.grid = grid_size(img_size, patch_size)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.fused_gather = fused_gather
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.pos_embed = fixed_pos_embed(embed_dim, self.grid)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, attention) for _ in range(depth))
        self.norm = StreamLayerNorm(embed_dim, eps=1e-6)
        self.apply(lambda m: _init_weights(m, init_std))
        if depth_scaled_init:
            _rescale_blocks(self.blocks)

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def forward(self, images: torch.Tensor, context_idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_layers(images, context_idx, last=1)[0]

    def forward_layers(
        self, images: torch.Tensor, context_idx: torch.Tensor | None = None, last: int = 1
    ) -> list[torch.Tensor]:
        """The tokens after each of the last ``last`` blocks, oldest first, each through the final
        LayerNorm (so the last one is ``forward``'s): ``last`` tensors [B, K or N, D]."""
        if not 1 <= last <= max(len(self.blocks), 1):
            raise ValueError(f"last={last}: the encoder has {len(self.blocks)} blocks")
        x = self.embed(images, context_idx)
        kept = []
        for i, blk in enumerate(self.blocks):
            x = self._run_block(blk, x)
            if len(self.blocks) - last <= i < len(self.blocks) - 1:
                kept.append(x)
        return [self.norm(t) for t in [*kept, x]]

    def embed(self, images: torch.Tensor, context_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens plus position embeddings: [B, N, D], or [B, K, D] at ``context_idx``.

        Images off the training size get the position table resampled to their grid; the context
        indices (masks) index the training grid, so they need images of the training size."""
        H, W = images.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        size = (H // p, W // p)
        x = self.patch_embed(images)  # (B, N, D), the autocast dtype under autocast
        if context_idx is None:
            return x + self._in_stream(interpolate_pos_embed(self.pos_embed, self.grid, size), x)
        if size != (self.grid, self.grid):
            raise ValueError(
                f"context indices index the {self.grid}x{self.grid} training grid, but the images give "
                f"{size[0]}x{size[1]} patches"
            )
        pos = self._in_stream(self.pos_embed, x)
        return ops.gather_tokens_with_pos(x, pos, context_idx, fused=self.fused_gather)  # (B, K, D)


class VisionTransformerPredictor(_BlockStack):
    """Narrow ViT that predicts target-block representations from the context tokens.

    forward(ctx [B, Kc, D], context_idx [B, Kc], target_idx [M, B, Kt]) -> [M*B, Kt, D], one batched
    pass over all M blocks: each block's sequence is (the B context tokens, that block's Kt mask tokens).
    """

    def __init__(
        self,
        num_patches: int,
        embed_dim: int = 768,
        predictor_embed_dim: int = 384,
        depth: int = 6,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        init_std: float = 0.02,
        attention: str = "sdpa",
        fused_gather: bool = True,
        depth_scaled_init: bool = False,
    ):
        super().__init__()
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise ValueError(f"the predictor needs a square patch grid, got {num_patches} patches")
        self.fused_gather = fused_gather
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))
        self.predictor_pos_embed = fixed_pos_embed(predictor_embed_dim, grid)
        self.predictor_blocks = nn.ModuleList(
            Block(predictor_embed_dim, num_heads, mlp_ratio, attention) for _ in range(depth)
        )
        self.predictor_norm = StreamLayerNorm(predictor_embed_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim)
        self.apply(lambda m: _init_weights(m, init_std))
        nn.init.trunc_normal_(self.mask_token, std=init_std)
        if depth_scaled_init:
            _rescale_blocks(self.predictor_blocks)

    def forward(self, ctx: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        target_idx = ops.as_blocks(target_idx)
        M, B, _ = target_idx.shape
        if ctx.shape[0] != B or context_idx.shape != ctx.shape[:2]:
            raise ValueError(
                f"context tokens {tuple(ctx.shape)} do not match context indices "
                f"{tuple(context_idx.shape)} and target indices {tuple(target_idx.shape)}"
            )
        x = self.predictor_embed(ctx)  # (B, Kc, Dp), the autocast dtype under autocast
        pos = self._in_stream(self.predictor_pos_embed, x)
        x = x + ops.gather_tokens(pos.expand(B, -1, -1), context_idx, fused=self.fused_gather)
        Kc = x.shape[1]
        queries = ops.predictor_mask_tokens(
            self._in_stream(self.mask_token, x), pos, target_idx, fused=self.fused_gather
        )  # (M*B, Kt, Dp)
        x = torch.cat([x.repeat(M, 1, 1), queries], dim=1)  # (M*B, Kc+Kt, Dp)
        x = self.predictor_norm(self._run_blocks(self.predictor_blocks, x))
        return self.predictor_proj(x[:, Kc:])  # (M*B, Kt, D)


def build_encoder(
    name: str, img_size: int = 224, patch_size: int = 16, depth: int | None = None, **kwargs
) -> VisionTransformer:
    """An encoder of a named size (vit_tiny ... vit_giant); ``depth`` blocks instead of the size's when given."""
    size = vit_size(name)
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=size.embed_dim,
        depth=depth or size.depth,
        num_heads=size.num_heads,
        mlp_ratio=size.mlp_ratio,
        **kwargs,
    )


def build_predictor(
    encoder: VisionTransformer, depth: int, embed_dim: int = 384, **kwargs
) -> VisionTransformerPredictor:
    """The predictor for ``encoder``: the encoder's number of heads (authors), width ``embed_dim``."""
    return VisionTransformerPredictor(
        num_patches=encoder.num_patches,
        embed_dim=encoder.embed_dim,
        predictor_embed_dim=embed_dim,
        depth=depth,
        num_heads=encoder.num_heads,
        **kwargs,
    )


# Inductor's settings for ``speed.fused_epilogue``: GEMMs may be Triton templates, which take the bias,
# the GELU (Inductor lowers nn.GELU to its exact erf form) and the residual add as their epilogue;
# each GEMM's fused template is benchmarked against cuBLAS plus a separate kernel and the faster kept.
# Not cuBLASLt's GELU epilogue (``_addmm_activation``): that is the tanh approximation.
FUSED_EPILOGUE_OPTIONS = {
    "max_autotune_gemm": True,
    "max_autotune_gemm_backends": "ATEN,TRITON",
    "epilogue_fusion": True,
    "benchmark_epilogue_fusion": True,
}


def compile_blocks(module: nn.Module, fused_epilogue: bool = False) -> None:
    """Regional compilation: each transformer block on its own, so compile time stays small;
    ``fused_epilogue``: with ``FUSED_EPILOGUE_OPTIONS``."""
    options = dict(FUSED_EPILOGUE_OPTIONS) if fused_epilogue else None
    for sub in module.modules():
        if isinstance(sub, Block):
            sub.compile(options=options)
