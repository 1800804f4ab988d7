"""The FSDP2 engine's mixed precision, in one place (the engine builds it, the scaling model reads it).

Under a bf16 autocast on a GPU the blocks gather their parameters in bf16; gradients are
reduce-scattered in fp32 everywhere; the roots (patch embedding, positional embeddings, mask token,
final norms) keep fp32; no module casts its inputs, so the residual stream stays fp32 (``engine``'s
docstring). On a CPU the blocks gather fp32 too: CPU autocast runs LayerNorm in its input's dtype
and refuses bf16 weights beside an fp32 input (CUDA autocast runs it in fp32), so there the engine
takes the DeepSpeed engine's numerics, autocast casting each op's weights.
"""

from __future__ import annotations

import torch

REDUCE_DTYPE = torch.float32


def param_dtype(amp_dtype: torch.dtype | None, block: bool, device_type: str = "cuda") -> torch.dtype | None:
    """The dtype a block (``block``) or a root gathers its parameters in; None: their own (fp32)."""
    return amp_dtype if block and amp_dtype is not None and device_type != "cpu" else None


def mixed_precision(amp_dtype: torch.dtype | None, block: bool, device_type: str = "cuda"):
    """FSDP2's ``MixedPrecisionPolicy`` for a block or a root under autocast ``amp_dtype``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(
        param_dtype=param_dtype(amp_dtype, block, device_type), reduce_dtype=REDUCE_DTYPE, cast_forward_inputs=False
    )
