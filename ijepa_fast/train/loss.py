"""The I-JEPA loss between predictions and normalised target features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ijepa_fast.config.choices import LOSSES


def jepa_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    """pred, target [M*B, Kt, D] -> scalar mean over all elements.

    smooth_l1: Huber with beta 1, as the authors' code. l2: squared error, as the paper's text.
    Computed in fp32 whatever the autocast dtype.
    """
    if pred.shape != target.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ in shape")
    pred, target = pred.float(), target.float()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=1.0)
    if kind == "l2":
        return F.mse_loss(pred, target)
    raise ValueError(f"loss={kind!r} is unknown: choose one of {LOSSES}")
