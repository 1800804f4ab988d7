"""Analytic FLOP count of one I-JEPA training step, per image (the "model FLOPs" of MFU).

Notation: encoder width D, depth L, MLP hidden F (= 4D; 48/11 D for ViT-G), patch p, N = (S/p)^2
patches; predictor width Dp, depth Lp, hidden Fp = 4 Dp; Kc context tokens, Kt tokens per target
block, M target blocks. A matrix product of [T, a] by [a, b] costs 2*T*a*b FLOPs (multiply + add).

One transformer block over a sequence of T tokens of width W with MLP hidden H::

    block(T, W, H) = 2*T*W*3W      qkv projection
                   + 2*T*T*W       Q K^T  (all heads together: heads * 2*T*T*(W/heads))
                   + 2*T*T*W       softmax(.) V
                   + 2*T*W*W       output projection
                   + 2*T*W*H * 2   MLP fc1 and fc2
                   = 8*T*W^2 + 4*T*W*H + 4*T^2*W

Per image::

    patch_embed      = 2 * N * (3*p*p) * D            (a stride-p convolution over all N patches)
    target_fwd       = patch_embed + L * block(N, D, F)
    context_fwd      = patch_embed + L * block(Kc, D, F)   (the encoder embeds all N patches, then
                                                             keeps the Kc context tokens)
    predictor_fwd    = 2*Kc*D*Dp                       (predictor_embed, once per image)
                     + M * Lp * block(Kc + Kt, Dp, Fp)  (one sequence per target block)
                     + 2*M*Kt*Dp*D                      (predictor_proj, on the mask tokens only)
    context_bwd      = 2 * (context_fwd - patch_embed) + patch_embed
    predictor_bwd    = 2 * predictor_fwd
    total            = target_fwd + context_fwd + context_bwd + predictor_fwd + predictor_bwd

Backward = 2x forward for every matrix product (the gradient of the input and of the weight each
cost one product of the forward's size; for attention, dQ, dK, dV and dP are four T x T products
against the forward's two), except the patch embedding, whose input (the image) needs no gradient:
only the weight gradient is computed, 1x. The target encoder runs forward only (no gradients).

Excluded (not matrix products, and not counted by ``torch.utils.flop_counter.FlopCounterMode``
either): LayerNorms, GELU, softmax, the attention scale, residual adds, biases, position-embedding
adds, token gathers, the target normalisation, the loss, AdamW and the EMA update. They are a few
percent of the FLOPs but memory-bound, so their cost shows in time, not in this count. Activation
checkpointing or attention kernels that recompute in backward do more work than counted: this is the
model's arithmetic, the standard numerator of MFU.

ViT-H/14 at 224 px (N = 256) with the paper's averages Kc = 72, Kt = 43, M = 4, predictor 12 x 384:
671 GFLOP per image (target forward 333, context forward + backward 275, predictor forward +
backward 62), beside the "about 650 GFLOP" of a back-of-the-envelope count for the paper's setting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ijepa_fast.models.vit import grid_size, vit_size

PREDICTOR_MLP_RATIO = 4.0  # VisionTransformerPredictor's default, for every encoder size


def linear_flops(tokens: float, d_in: int, d_out: int) -> float:
    """A linear layer on ``tokens`` rows: 2 * tokens * d_in * d_out."""
    return 2.0 * tokens * d_in * d_out


def block_flops(tokens: float, width: int, hidden: int, seqs: float = 1.0) -> float:
    """One transformer block forward over ``seqs`` sequences of ``tokens`` tokens each."""
    t, w = float(tokens), float(width)
    return seqs * (8.0 * t * w * w + 4.0 * t * w * hidden + 4.0 * t * t * w)


def attention_flops(tokens: float, width: int, seqs: float = 1.0) -> float:
    """The two T x T products of one attention layer (Q K^T and softmax(.) V): 4 * T^2 * W per sequence."""
    return seqs * 4.0 * float(tokens) ** 2 * width


def patch_embed_flops(num_patches: int, patch_size: int, width: int, in_chans: int = 3) -> float:
    return linear_flops(num_patches, in_chans * patch_size * patch_size, width)


def encoder_forward_flops(
    model_name: str, patch_size: int, img_size: int, tokens: float | None = None, depth: int | None = None
) -> float:
    """Encoder forward per image: patch embedding of all N patches plus L blocks on ``tokens``
    tokens (None: all N, the target encoder; Kc: the context encoder); L = ``depth`` or the size's."""
    size = vit_size(model_name)
    n = grid_size(img_size, patch_size) ** 2
    t = n if tokens is None else tokens
    hidden = int(size.embed_dim * size.mlp_ratio)
    blocks = depth or size.depth
    return patch_embed_flops(n, patch_size, size.embed_dim) + blocks * block_flops(t, size.embed_dim, hidden)


def predictor_forward_flops(enc_width: int, pred_width: int, depth: int, kc: float, kt: float, m: int) -> float:
    """Predictor forward per image: embed the Kc context tokens, M sequences of Kc + Kt tokens
    through ``depth`` blocks, project the M * Kt mask tokens back to the encoder width."""
    hidden = int(pred_width * PREDICTOR_MLP_RATIO)
    return (
        linear_flops(kc, enc_width, pred_width)
        + depth * block_flops(kc + kt, pred_width, hidden, seqs=m)
        + linear_flops(m * kt, pred_width, enc_width)
    )


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step for one image, by part (see the module docstring)."""

    target_fwd: float
    context_fwd: float
    context_bwd: float
    predictor_fwd: float
    predictor_bwd: float

    @property
    def total(self) -> float:
        return self.target_fwd + self.context_fwd + self.context_bwd + self.predictor_fwd + self.predictor_bwd

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def step_flops(
    model_name: str = "vit_huge",
    patch_size: int = 14,
    img_size: int = 224,
    kc: float = 72.0,
    kt: float = 43.0,
    m: int = 4,
    pred_depth: int = 12,
    pred_emb_dim: int = 384,
    depth: int | None = None,
) -> StepFlops:
    """Per-image FLOPs of a training step for an encoder preset and mask sizes (averages are fine:
    the count is linear in Kc and Kt except for the attention's T^2 terms); ``depth``: encoder
    blocks, when not the size's."""
    size = vit_size(model_name)
    n = grid_size(img_size, patch_size) ** 2
    pe = patch_embed_flops(n, patch_size, size.embed_dim)
    ctx = encoder_forward_flops(model_name, patch_size, img_size, tokens=kc, depth=depth)
    pred = predictor_forward_flops(size.embed_dim, pred_emb_dim, pred_depth, kc, kt, m)
    return StepFlops(
        target_fwd=encoder_forward_flops(model_name, patch_size, img_size, depth=depth),
        context_fwd=ctx,
        context_bwd=2.0 * (ctx - pe) + pe,
        predictor_fwd=pred,
        predictor_bwd=2.0 * pred,
    )


def step_flops_for_masks(model_cfg, img_size: int, mask_shapes: list[tuple[int, int, int]]) -> float:
    """Mean per-image FLOPs of steps over batches whose masks have shapes (M, Kc, Kt); exact per
    batch (the T^2 attention terms make a mean of sizes slightly off). ``model_cfg``: a ModelConfig."""
    if not mask_shapes:
        raise ValueError("mask_shapes is empty: give the (M, Kc, Kt) of at least one batch")
    total = 0.0
    for m, kc, kt in mask_shapes:
        total += step_flops(
            model_cfg.name,
            model_cfg.patch_size,
            img_size,
            kc,
            kt,
            m,
            model_cfg.pred_depth,
            model_cfg.pred_emb_dim,
            model_cfg.depth or None,
        ).total
    return total / len(mask_shapes)
