"""A byte-and-FLOP model of one training step, per phase: predicted milliseconds on a given GPU.

Each phase of the step (``bench.timing.PHASES``: data, target_fwd, context_fwd, predictor_fwd,
backward, optimizer, ema, sync) costs

    ms = GEMM FLOPs / (peak * gemm_efficiency)            (linears and patch embedding; bf16 or fp8 peak)
       + attention FLOPs / (bf16 peak * attention_efficiency)   (fused attention: its FLOPs, no bytes)
       + memory-bound bytes / (HBM bandwidth * memory_efficiency)
       + host-to-device bytes / PCIe bandwidth            (only where the copy blocks the compute stream)
       + host syncs * sync_us + unfused launches * launch_us

Memory-bound bytes are those of the kernels that are not GEMMs: LayerNorms, casts, bias and GELU
kernels, residual adds, the weights' autocast casts, AdamW, the EMA, the float8 quantisation; a
GEMM's own operands and an epilogue's extra reads are taken to hide under its compute. Per token of
width D (MLP hidden F) and block, with a = 2 bytes (bf16 activations) and r the residual stream's
bytes (4: fp32, the authors'; 2 with ``speed.bf16_residual``), forward, kernels as Inductor fuses
them in a compiled block:

    LayerNorm 1 (+ cast)            (r + a) D       read x, write its normalised bf16 copy
    residual add 1 + LayerNorm 2    2 (r + a) D     read x and the projection, write x and LN's copy
    bias + GELU                     2 a F           read fc1's output, write GELU's
    residual add 2                  (2 r + a) D

``speed.fused_epilogue`` moves the residual adds and the GELU into the GEMMs: LayerNorm 2 alone
remains, (r + a) D. Uncompiled (the authors' preset) each op is a kernel, and LayerNorm gives fp32
under autocast, cast to bf16 by its own kernel: LayerNorm (r + 4 + 4 + a) D each (bf16 in and out
with ``speed.bf16_residual``: (r + a) D). Backward per token and block: two LayerNorm backwards (3 r
+ a) D each, and GELU's backward 3 a F (in the GEMM's epilogue with fused epilogues); uncompiled,
the residual gradients' adds 2 * 3 r D and the casts' 2 (a + r) D as well. The math attention
(authors) writes and reads its T x T scores: 16 bytes per score forward (bf16 scores, fp32 softmax,
bf16 probabilities), twice that backward.

Weights: autocast casts each fp32 weight to bf16 in each forward (read 4, write 2 bytes per
parameter) unless the target reads a bf16 copy (``speed.bf16_target_copy``: the EMA writes 2 more
bytes per parameter) or float8 weights (``speed.fp8_target``: quantised after the EMA, an amax pass
and a cast pass over the fp32 weight, read 4 + 4, write 1; each float8 linear's input quantised per
forward: ``quantise_bytes_per_token``), the float8 linears' FLOPs at the fp8 peak. Gradients: bf16
written, accumulated into fp32 (6 bytes per parameter). AdamW fused 28 bytes per parameter (read
weight, gradient, two moments; write three), the foreach one 68; the EMA fused 12 bytes per
parameter, the authors' loop 32 and three launches per tensor. Images: float32 over PCIe on the
compute stream (``data`` phase, real loaders only: synthetic batches are made on the device);
``speed.uint8_input``: a quarter of the bytes, copied on a side stream a batch ahead (off the
critical path), normalised on the device (read 1, write 4).

Left out: the patch embedding's and the loss's elementwise work, bias gradients, kernel launch gaps
of compiled code. The efficiencies are assumptions, not measurements: the first GPU run (gpu-check's
ablation stage prints predicted beside measured per row) shows where the model is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ijepa_fast.models.flops import PREDICTOR_MLP_RATIO
from ijepa_fast.models.vit import grid_size, vit_size

PHASES = ("data", "target_fwd", "context_fwd", "predictor_fwd", "backward", "optimizer", "ema", "sync")
ACT = 2  # bytes of a bf16 activation


@dataclass(frozen=True)
class DeviceModel:
    """A GPU's datasheet peaks and the efficiencies the model assumes for them."""

    name: str
    bf16_tflops: float  # dense
    fp8_tflops: float  # dense
    hbm_gb_s: float
    h2d_gb_s: float  # host-to-device copies (PCIe)
    gemm_efficiency: float = 0.7  # assumed share of the peak the encoder's GEMMs reach
    attention_efficiency: float = 0.4  # assumed, fused attention over 72-256 tokens per sequence
    memory_efficiency: float = 0.8  # assumed share of HBM bandwidth memory-bound kernels reach
    launch_us: float = 4.0  # assumed cost of one small kernel launched from an eager loop
    sync_us: float = 20.0  # assumed cost of one host read of a device value (the queue drains)


# NVIDIA's H100 SXM5 datasheet: 989.4 dense bf16 TFLOP/s, 1978.9 dense fp8, HBM3 3.35 TB/s, PCIe Gen5 x16 64 GB/s.
H100_SXM = DeviceModel("H100 SXM (datasheet)", 989.4, 1978.9, 3350.0, 64.0)


@dataclass(frozen=True)
class Switches:
    """What the model reads of a ``speed`` section (and of the other helpers' keys, when present)."""

    compiled: bool = True
    math_attention: bool = False
    fused_ema: bool = True
    fused_optimizer: bool = True
    grad_scaler: bool = False
    sync_every_step: bool = False
    fp8_target: str = "off"
    fused_epilogue: bool = False
    bf16_target_copy: bool = False
    bf16_residual: bool = False
    uint8_input: bool = False

    @classmethod
    def from_speed(cls, speed: dict, device_type: str = "cuda") -> Switches:
        """From a resolved ``speed`` section as a dict (``asdict(cfg.speed)``); keys it lacks keep
        their defaults here (off)."""
        compile_mode = speed.get("compile", "auto")
        return cls(
            compiled=compile_mode == "on" or (compile_mode == "auto" and device_type == "cuda"),
            math_attention=speed.get("attention") == "math",
            **{k: speed[k] for k in cls.__dataclass_fields__ if k in speed and k not in ("compiled", "math_attention")},
        )


@dataclass(frozen=True)
class Shape:
    """One step's sizes: batch, tokens, widths, depths, parameter counts."""

    batch: int
    img: int
    tokens: int  # N patches per image
    kc: float  # context tokens per image
    kt: float  # tokens per target block
    masks: int  # target blocks M
    width: int
    hidden: int
    depth: int
    heads: int
    patch: int
    pred_width: int
    pred_hidden: int
    pred_depth: int

    @classmethod
    def from_config(cls, cfg, kc: float, kt: float, masks: int) -> Shape:
        size = vit_size(cfg.model.name)
        pw = cfg.model.pred_emb_dim
        return cls(
            batch=cfg.data.batch_size * cfg.optim.grad_accum,
            img=cfg.data.crop_size,
            tokens=grid_size(cfg.data.crop_size, cfg.model.patch_size) ** 2,
            kc=kc,
            kt=kt,
            masks=masks,
            width=size.embed_dim,
            hidden=int(size.embed_dim * size.mlp_ratio),
            depth=cfg.model.depth or size.depth,
            heads=size.num_heads,
            patch=cfg.model.patch_size,
            pred_width=pw,
            pred_hidden=int(pw * PREDICTOR_MLP_RATIO),
            pred_depth=cfg.model.pred_depth,
        )

    def block_linear_params(self, width: int, hidden: int) -> int:
        """qkv, proj, fc1, fc2: weights and biases."""
        return 4 * width * width + 2 * width * hidden + 3 * width + width + hidden + width

    @property
    def encoder_matmul_params(self) -> int:
        """The patch embedding's and the block linears' (what autocast casts)."""
        return (
            3 * self.patch**2 * self.width + self.width + self.depth * self.block_linear_params(self.width, self.hidden)
        )

    @property
    def encoder_params(self) -> int:
        return self.encoder_matmul_params + 2 * self.width * (2 * self.depth + 1)  # and the LayerNorms

    @property
    def predictor_matmul_params(self) -> int:
        d, p = self.width, self.pred_width
        return d * p + p + self.pred_depth * self.block_linear_params(p, self.pred_hidden) + p * d + d

    @property
    def predictor_params(self) -> int:
        return self.predictor_matmul_params + 2 * self.pred_width * (2 * self.pred_depth + 1) + self.pred_width


@dataclass
class Cost:
    """One phase's work: FLOPs by kind, bytes by path, and waits."""

    gemm_flops: float = 0.0  # at the bf16 peak
    fp8_flops: float = 0.0  # at the fp8 peak
    attention_flops: float = 0.0
    hbm_bytes: float = 0.0
    h2d_bytes: float = 0.0
    launches: float = 0.0
    syncs: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))

    def ms(self, dev: DeviceModel) -> float:
        s = (
            self.gemm_flops / (dev.bf16_tflops * 1e12 * dev.gemm_efficiency)
            + self.fp8_flops / (dev.fp8_tflops * 1e12 * dev.gemm_efficiency)
            + self.attention_flops / (dev.bf16_tflops * 1e12 * dev.attention_efficiency)
            + self.hbm_bytes / (dev.hbm_gb_s * 1e9 * dev.memory_efficiency)
            + self.h2d_bytes / (dev.h2d_gb_s * 1e9)
        )
        return 1e3 * s + 1e-3 * (self.launches * dev.launch_us + self.syncs * dev.sync_us)


def block_bytes_per_token(width: int, hidden: int, r: int, sw: Switches, backward: bool) -> float:
    """Memory-bound bytes of one block per token (the module docstring's table)."""
    d, f, a = width, hidden, ACT
    if not backward:
        if sw.fused_epilogue and sw.compiled:
            return 2 * (r + a) * d  # LayerNorm 1 and 2; bias, GELU and residual adds in the GEMMs
        if sw.compiled:
            return (r + a) * d + 2 * (r + a) * d + 2 * a * f + (2 * r + a) * d
        ln = (r + a) * d if sw.bf16_residual else (r + 4 + 4 + a) * d  # fp32 LayerNorm output, then its cast
        return 2 * ln + 2 * (2 * r + a) * d + 2 * a * f
    ln_bwd = 2 * (3 * r + a) * d
    if sw.fused_epilogue and sw.compiled:
        return ln_bwd
    if sw.compiled:
        return ln_bwd + 3 * a * f
    return ln_bwd + 3 * a * f + 2 * 3 * r * d + 2 * (a + r) * d


def quantise_bytes_per_token(width: int, hidden: int, sw: Switches) -> float:
    """Extra bytes of quantising the four float8 linears' inputs, per token and block.

    Rowwise in a compiled block: a per-token amax is a row reduction, which Inductor folds into the
    kernel that makes the row (LayerNorm 1 and 2, the GELU), which then writes 1 byte instead of a;
    the attention's output takes a pass of its own (read a, write 1). With fused epilogues the GELU
    is in fc1's epilogue, which sees a tile of a row, not the row: its output takes a pass too.
    Tensorwise, or uncompiled: every input an amax pass and a cast pass (read 2a, write 1)."""
    d, f, a = width, hidden, ACT
    if sw.fp8_target == "rowwise" and sw.compiled:
        gelu = (a + 1) * f if sw.fused_epilogue else -(a - 1) * f
        return (a + 1) * d - 2 * (a - 1) * d + gelu
    return (2 * a + 1) * (3 * d + f)


def attention_cost(tokens: float, width: int, heads: int, seqs: float, sw: Switches, backward: bool) -> Cost:
    """Q K^T and softmax(.) V over ``seqs`` sequences: their FLOPs; with math attention, the scores' bytes."""
    flops = seqs * 4.0 * tokens**2 * width * (2 if backward else 1)
    if sw.math_attention:
        return Cost(gemm_flops=flops, hbm_bytes=seqs * heads * tokens**2 * 16 * (2 if backward else 1))
    return Cost(attention_flops=flops)


def encoder_cost(s: Shape, tokens: float, r: int, sw: Switches, backward: bool, fp8: bool = False) -> Cost:
    """``depth`` encoder blocks over ``tokens`` tokens per image (forward, or backward: twice the GEMMs)."""
    rows = s.batch * tokens
    linear = rows * (8.0 * s.width**2 + 4.0 * s.width * s.hidden) * (2 if backward else 1)
    per_block = Cost(hbm_bytes=rows * block_bytes_per_token(s.width, s.hidden, r, sw, backward))
    per_block += Cost(fp8_flops=linear) if fp8 else Cost(gemm_flops=linear)
    if fp8:
        per_block += Cost(hbm_bytes=rows * quantise_bytes_per_token(s.width, s.hidden, sw))
    per_block += attention_cost(tokens, s.width, s.heads, s.batch, sw, backward)
    return Cost(*(s.depth * getattr(per_block, f) for f in Cost.__dataclass_fields__))


def predictor_cost(s: Shape, r: int, sw: Switches, backward: bool) -> Cost:
    seqs = s.masks * s.batch
    t = s.kc + s.kt
    wide = replace(s, width=s.pred_width, hidden=s.pred_hidden, depth=s.pred_depth, batch=seqs)
    blocks = encoder_cost(wide, t, r, sw, backward)
    embed = 2.0 * s.batch * s.kc * s.width * s.pred_width + 2.0 * seqs * s.kt * s.pred_width * s.width
    return blocks + Cost(gemm_flops=embed * (2 if backward else 1))


def patch_embed_flops(s: Shape) -> float:
    return 2.0 * s.batch * s.tokens * 3 * s.patch**2 * s.width


def step_costs(s: Shape, sw: Switches, real_loader: bool = False) -> dict[str, Cost]:
    """Every phase's ``Cost`` for one optimizer step."""
    r = 2 if sw.bf16_residual else 4
    pixels = s.batch * 3 * s.img**2
    cast = 6.0  # autocast's fp32 -> bf16 copy of a weight: read 4, write 2 bytes
    enc, student = s.encoder_params, s.encoder_params + s.predictor_params
    linears = s.depth * s.block_linear_params(s.width, s.hidden)
    fp8 = sw.fp8_target != "off"
    out: dict[str, Cost] = {p: Cost() for p in PHASES}

    if real_loader:
        if sw.uint8_input:  # copied a batch ahead on a side stream; normalised here
            out["data"] = Cost(hbm_bytes=pixels * (1 + 4))
        else:
            out["data"] = Cost(h2d_bytes=pixels * 4)

    enc_cast, pred_cast = s.encoder_matmul_params, s.predictor_matmul_params
    target_weights = 0.0 if (sw.bf16_target_copy or fp8) else cast * enc_cast
    if fp8 and not sw.bf16_target_copy:
        target_weights = cast * (enc_cast - linears)  # the patch embedding is still cast
    targets = s.batch * s.tokens * s.width * (r + 4 + 4 + 4)  # final LayerNorm; the targets' norm and gather
    out["target_fwd"] = encoder_cost(s, s.tokens, r, sw, backward=False, fp8=fp8) + Cost(
        gemm_flops=patch_embed_flops(s), hbm_bytes=target_weights + targets
    )
    out["context_fwd"] = encoder_cost(s, s.kc, r, sw, backward=False) + Cost(
        gemm_flops=patch_embed_flops(s), hbm_bytes=cast * enc_cast
    )
    out["predictor_fwd"] = predictor_cost(s, r, sw, backward=False) + Cost(hbm_bytes=cast * pred_cast)
    out["backward"] = (
        encoder_cost(s, s.kc, r, sw, backward=True)
        + predictor_cost(s, r, sw, backward=True)
        # only the weight gradient of the patch embedding; gradients accumulated into fp32
        + Cost(gemm_flops=patch_embed_flops(s), hbm_bytes=6.0 * student)
    )
    out["optimizer"] = Cost(hbm_bytes=(28.0 if sw.fused_optimizer else 68.0) * student)
    if sw.grad_scaler:  # unscale the gradients, read the found-inf flag
        out["optimizer"] += Cost(hbm_bytes=8.0 * student, syncs=1)
    tensors = 12 * s.depth + 5  # the encoder's parameter tensors: 12 per block, patch embedding, position, norm
    ema = Cost(hbm_bytes=12.0 * enc) if sw.fused_ema else Cost(hbm_bytes=32.0 * enc, launches=3 * tensors)
    if sw.bf16_target_copy:
        ema += Cost(hbm_bytes=2.0 * enc)
    if fp8:
        ema += Cost(hbm_bytes=9.0 * linears)
    out["ema"] = ema
    if sw.sync_every_step:  # a norm per weight matrix read to the host (after the AdamW step), the loss, a synchronize
        out["optimizer"] += Cost(hbm_bytes=4.0 * enc, syncs=4 * s.depth + 1)
        out["sync"] = Cost(syncs=2)
    return out


def predict_ms(
    cfg,
    kc: float,
    kt: float,
    masks: int,
    dev: DeviceModel = H100_SXM,
    real_loader: bool = False,
    switches: Switches | None = None,
) -> dict[str, float]:
    """Predicted ms per phase (and ``total``) of a ``Config``'s step at mean mask sizes (Kc, Kt, M);
    ``switches``: instead of the config's ``speed`` section (on a CUDA device)."""
    from dataclasses import asdict

    sw = switches or Switches.from_speed(asdict(cfg.speed))
    costs = step_costs(Shape.from_config(cfg, kc, kt, masks), sw, real_loader)
    ms = {phase: cost.ms(dev) for phase, cost in costs.items()}
    return {**ms, "total": sum(ms.values())}
