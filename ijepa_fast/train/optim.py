"""AdamW as the authors set it up, and the per-step learning rate and weight decay."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(module: nn.Module) -> list[dict]:
    """AdamW groups as the authors: weight decay on weights, none on biases and 1-D parameters."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay, "wd_exclude": False}, {"params": no_decay, "wd_exclude": True, "weight_decay": 0.0}]


def adamw_implementation(device_type: str, fused: bool) -> dict:
    """torch AdamW's implementation switch: its fused kernels (CUDA and CPU; foreach elsewhere) when
    ``fused``; nothing (torch's own default, as the authors: foreach on CUDA) otherwise. Only the
    fused kernels take a ``found_inf`` flag, which the engines use to skip a non-finite step on the
    device."""
    if not fused:
        return {}
    return {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}


def build_optimizer(student: nn.Module, optim_cfg, device: torch.device, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over the student (``adamw_implementation`` of ``device`` and ``fused``), as the authors'
    ``torch.optim.AdamW(param_groups)``."""
    kwargs: dict = {
        "betas": tuple(optim_cfg.betas),
        "eps": optim_cfg.eps,
        "lr": optim_cfg.start_lr,
        "weight_decay": optim_cfg.weight_decay,
        **adamw_implementation(device.type, fused),
    }
    return torch.optim.AdamW(param_groups(student), **kwargs)


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """The step's learning rate on every group, its weight decay on the groups that take one."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if not group.get("wd_exclude", False):
            group["weight_decay"] = wd
