"""A persistent bf16 copy of the target encoder's matmul weights (``speed.bf16_target_copy``).

Under bf16 autocast every forward of the target encoder casts each Linear and Conv2d weight and bias
from fp32 to bf16: for ViT-H/14 that reads 2.5 GB and writes 1.3 GB per step, for weights that
change only once per step, in the EMA. The copy holds those casts: the fused EMA writes them in the
same pass that updates the fp32 weights (``kernels.ema.ema_update_``'s ``bf16_out``), and the target
forward reads them in place of the fp32 weights, so autocast's casts become no-ops.

Exact: fp32 -> bf16 rounds to nearest even in both the EMA and autocast, so the copy's bits are
autocast's cast of the fp32 weights, and the forward computes what it computed without the copy.
Everything else (LayerNorm affine, position embeddings) autocast leaves in fp32 and the forward still
reads from the target encoder itself. The fp32 weights stay the source of truth: the copy is no
parameter or buffer of any module, so state dicts and checkpoints never hold it; it is rebuilt from
the fp32 weights when made (after a checkpoint is restored) and by ``refresh``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

# The modules whose parameters autocast casts to its lower precision (matmul and convolution inputs).
_CAST_MODULES = (nn.Linear, nn.Conv2d)


def autocast_cast_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every weight and bias that autocast casts to bf16 in ``module``'s forward,
    in ``named_parameters`` order: those of its Linear and Conv2d submodules."""
    cast = {id(p) for m in module.modules() if isinstance(m, _CAST_MODULES) for p in m.parameters(recurse=False)}
    return [(name, p) for name, p in module.named_parameters() if id(p) in cast]


class Bf16TargetCopy:
    """``copy(images)``: the target encoder's forward reading the bf16 copy of its matmul weights.

    ``outputs_for(targets)`` aligns the copy with the EMA's list of target tensors: the bf16 tensor of
    each that has one, else None (``ema_update_``'s ``bf16_out``).
    """

    def __init__(self, target_encoder: nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.target_encoder = target_encoder
        params = autocast_cast_params(target_encoder)
        self._sources = [p for _, p in params]
        self.tensors: dict[str, torch.Tensor] = {name: p.detach().to(dtype) for name, p in params}

    @torch.no_grad()
    def refresh(self) -> None:
        """Recast every copy from the fp32 weights (after they were changed other than by the EMA)."""
        torch._foreach_copy_(list(self.tensors.values()), [p.detach() for p in self._sources])

    def outputs_for(self, targets: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The bf16 copy of each of ``targets`` (the target encoder's parameters), or None."""
        # keyed by the parameters' ids here, not once in __init__: a deep copy of the step gets new
        # parameters, and a map made before it would leave the copy's EMA writing no bf16 copy
        by_param = {id(p): t for p, t in zip(self._sources, self.tensors.values())}
        return [by_param.get(id(t)) for t in targets]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, N, D], as ``target_encoder(images)`` under bf16 autocast."""
        return functional_call(self.target_encoder, self.tensors, (images,), strict=False)
