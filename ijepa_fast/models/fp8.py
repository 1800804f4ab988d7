"""Float8 forward of the target encoder's block linears (``speed.fp8_target``), over torchao's float8.

The target encoder runs forward only, on every patch: half of a step's FLOPs, and no gradient, so its
four block linears (qkv, proj, fc1, fc2) can run on the float8 tensor cores (e4m3: 3 mantissa bits)
at twice the bf16 rate. The fp32 EMA weights stay the source of truth (the EMA updates them, the
checkpoints hold them); each linear keeps an e4m3 copy of its weight and its scale in buffers (not in
the state dict), written by ``requantize`` once per step, right after the EMA (``train.step``), not
in every forward. Each forward quantises its input (dynamic scaling: the amax of this batch's values)
and multiplies with ``torch._scaled_mm`` through torchao's ``Float8TrainingTensor``; on a device
without float8 tensor cores (the CPU, for the tests) in torchao's emulation mode, where the same
e4m3 values are multiplied in fp32.

Recipes (the scales):

- ``rowwise``: one scale per token (input row) and one per output channel (weight row). e4m3's
  normal range spans 2^15 (448 down to 2^-6): under one scale per tensor, a token 10^4 or more times
  larger than the others pushes their values into e4m3's subnormals, where they keep fewer bits;
  per-row scales confine it to its own row, and give each output channel's weights its own range.
  LayerNorm already puts the inputs of qkv and fc1 on one scale per token; those of proj (attention
  outputs) and fc2 (GELU outputs) are not. The cost: a rowwise-scaled GEMM (CUTLASS on Hopper),
  a little slower than the tensorwise cuBLAS one. The recipe to try first, for its accuracy margin,
  since the function changes; the ablation measures both.
- ``tensorwise``: one scale per tensor: the fastest GEMM, the coarsest scales.

The predictor stays in bf16: its width (384) gives GEMMs too small for float8 to gain.
What changes: every target carries the rounding of e4m3 operands (a relative error of up to 2^-4
per element before the accumulation); the forward GEMM accumulates with Hopper's fast accumulation
(torchao's choice for forward GEMMs), which the emulation does not reproduce.
"""

from __future__ import annotations

import torch
from torch import nn

from ijepa_fast.config.choices import FP8_RECIPES
from ijepa_fast.runtime import optional

E4M3 = torch.float8_e4m3fn
RECIPES = tuple(r for r in FP8_RECIPES if r != "off")
# The block linears that run in float8, as (child module, attribute) of each Block.
BLOCK_LINEARS = (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2"))


def _torchao():
    """torchao's float8 pieces: (Float8TrainingTensor, LinearMMConfig, ScaledMMConfig, GemmInputRole,
    ScalingGranularity, tensor_to_scale, to_fp8_saturated)."""
    optional.require("torchao", "speed.fp8_target")
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_training_tensor import (
        Float8TrainingTensor,
        GemmInputRole,
        LinearMMConfig,
        ScaledMMConfig,
    )
    from torchao.float8.float8_utils import tensor_to_scale, to_fp8_saturated

    return (
        Float8TrainingTensor,
        LinearMMConfig,
        ScaledMMConfig,
        GemmInputRole,
        ScalingGranularity,
        tensor_to_scale,
        to_fp8_saturated,
    )


def float8_tensor_cores(device: torch.device) -> bool:
    """True on a CUDA device with float8 tensor cores (compute capability 8.9: Ada, Hopper and later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Float8ForwardLinear(nn.Module):
    """``y = x W^T + b`` with x and W in e4m3 (no gradient). ``weight`` and ``bias`` are the wrapped
    ``nn.Linear``'s own parameters, so state-dict names and the EMA's tensors do not change."""

    def __init__(self, linear: nn.Linear, recipe: str = "rowwise", emulate: bool = False):
        super().__init__()
        if recipe not in RECIPES:
            raise ValueError(f"float8 recipe {recipe!r}: choose one of {RECIPES}")
        self.weight = linear.weight  # (out, in), fp32: the EMA's
        self.bias = linear.bias
        self.recipe, self.emulate = recipe, emulate
        self._ao = _torchao()  # looked up once: the compiled forward sees plain attributes
        _, LinearMMConfig, ScaledMMConfig, *_ = self._ao
        # fast accumulation in the forward GEMM, as torchao's float8 recipes do (no effect when emulated)
        mm = ScaledMMConfig(emulate=emulate, use_fast_accum=True)
        self._mm = LinearMMConfig(mm, mm, mm)
        out_features, in_features = linear.weight.shape
        dev = linear.weight.device
        self.register_buffer("weight_fp8", torch.empty(out_features, in_features, dtype=E4M3, device=dev), False)
        scale_shape = (out_features, 1) if recipe == "rowwise" else ()
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=dev), False)
        self.requantize()

    @property
    def _axiswise_dim(self) -> int | None:
        return -1 if self.recipe == "rowwise" else None

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        """e4m3's largest value over the amax of ``x`` (per row of the last dim for rowwise)."""
        *_, ScalingGranularity, tensor_to_scale, _ = self._ao
        granularity = ScalingGranularity.AXISWISE if self.recipe == "rowwise" else ScalingGranularity.TENSORWISE
        return tensor_to_scale(x, E4M3, scaling_granularity=granularity, axiswise_dim=self._axiswise_dim)

    @torch.no_grad()
    def requantize(self) -> None:
        """The e4m3 copy of the current fp32 weight, written in place (the buffers keep their addresses,
        so a compiled forward sees the same tensors every step)."""
        to_fp8_saturated = self._ao[-1]
        scale = self._scale(self.weight)
        self.weight_scale.copy_(scale)
        self.weight_fp8.copy_(to_fp8_saturated(self.weight.float() * scale, E4M3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Float8TrainingTensor, _, _, GemmInputRole, _, _, to_fp8_saturated = self._ao
        # the output in what a bf16 linear would give: the autocast dtype, else the input's
        out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        rows = x.reshape(-1, x.shape[-1])  # (T, in)
        mm = self._mm
        scale = self._scale(rows)  # (T, 1) rowwise, () tensorwise
        data = to_fp8_saturated(rows.float() * scale, E4M3)
        a = Float8TrainingTensor(data, scale, out_dtype, mm, GemmInputRole.INPUT, self._axiswise_dim)
        w = Float8TrainingTensor(
            self.weight_fp8, self.weight_scale, out_dtype, mm, GemmInputRole.WEIGHT, self._axiswise_dim
        )
        with torch.autocast(x.device.type, enabled=False):  # the float8 operands are not to be recast
            # (T, out); the bias in the GEMM's epilogue on a GPU
            y = torch.mm(a, w.t()) if self.bias is None else torch.addmm(self.bias.to(out_dtype), a, w.t())
        return y.reshape(*x.shape[:-1], y.shape[-1])


def quantize_target_linears(encoder: nn.Module, recipe: str, emulate: bool) -> list[Float8ForwardLinear]:
    """Replace the block linears of ``encoder`` (a VisionTransformer) by ``Float8ForwardLinear`` in
    place; returns them, in block order. The patch embedding and the final norm stay as they are."""
    linears = []
    for blk in encoder.blocks:
        for child, name in BLOCK_LINEARS:
            parent = getattr(blk, child)
            layer = Float8ForwardLinear(getattr(parent, name), recipe, emulate)
            setattr(parent, name, layer)
            linears.append(layer)
    return linears


def float8_linears(module: nn.Module) -> list[Float8ForwardLinear]:
    """Every ``Float8ForwardLinear`` under ``module`` (none: an encoder in bf16)."""
    return [m for m in module.modules() if isinstance(m, Float8ForwardLinear)]


@torch.no_grad()
def requantize(linears: list[Float8ForwardLinear]) -> None:
    """The e4m3 weights of ``linears`` from their current fp32 weights (after each EMA update)."""
    for layer in linears:
        layer.requantize()
