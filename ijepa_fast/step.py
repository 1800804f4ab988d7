"""One I-JEPA training step in plain PyTorch (single process), free of host syncs.

target forward (no grad) -> normalise + gather -> context forward -> predictor -> loss -> backward
-> AdamW step -> EMA update of the target encoder. bf16 autocast on CUDA, fp32 on CPU, no GradScaler
unless the authors' preset asks for one. The step returns device tensors; reading them is the
caller's choice (the trainer does it every ``log_every`` steps).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ijepa_fast.masks import MaskBatch
from ijepa_fast.models.ijepa import JEPAStudent, compute_targets
from ijepa_fast.schedules import Schedules


def param_groups(module: nn.Module) -> list[dict]:
    """AdamW groups as the authors: weight decay on weights, none on biases and 1-D parameters."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay, "wd_exclude": False}, {"params": no_decay, "wd_exclude": True, "weight_decay": 0.0}]


def build_optimizer(student: nn.Module, optim_cfg, device: torch.device, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over the student; fused kernels on CUDA, foreach on CPU, plain loop when not ``fused``."""
    kwargs: dict = {
        "betas": tuple(optim_cfg.betas),
        "eps": optim_cfg.eps,
        "lr": optim_cfg.start_lr,
        "weight_decay": optim_cfg.weight_decay,
    }
    if fused and device.type == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = fused
    return torch.optim.AdamW(param_groups(student), **kwargs)


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if not group.get("wd_exclude", False):
            group["weight_decay"] = wd


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float, fused: bool = True) -> None:
    """target = m * target + (1 - m) * source over every parameter (buffers untouched)."""
    t_params = list(target.parameters())
    s_params = list(source.parameters())
    if fused:
        from ijepa_fast.kernels.ema import ema_update_

        ema_update_(t_params, s_params, momentum)
    else:  # the authors: one mul_ and one add_ per parameter
        for t, s in zip(t_params, s_params):
            t.mul_(momentum).add_((1.0 - momentum) * s.detach())


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """0-d bool tensor on the tensors' device: no element of any of them is inf or nan. No host sync.

    One fused max-|x| reduction (``_foreach_norm`` with ord=inf propagates nan): unlike a 2-norm it
    does not overflow on large finite weights.
    """
    tensors = [t.detach() for t in tensors if t.numel()]  # the inf-norm of an empty tensor is undefined
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors, ord=float("inf")))).all()


def autocast_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """bf16 autocast on CUDA ('auto' or 'bf16'), none (fp32) on CPU unless 'bf16' is asked for."""
    if dtype == "fp32" or (dtype == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


@dataclass
class StepOptions:
    loss: str = "smooth_l1"
    grad_clip: float = 0.0
    fused_ema: bool = True
    fused_gather: bool = True
    grad_scaler: bool = False
    sync_every_step: bool = False


class TrainStep:
    """Callable training step over (student, target encoder, optimizer, schedules).

    ``step(images [B,3,S,S], masks: MaskBatch, step: int) -> {"loss": 0-d tensor, ...}``.

    With ``grad_accum`` = k > 1 call it once per micro-batch, k times with the same optimizer
    ``step``: each call adds the gradient of its loss / k, and the k-th clips, steps the optimizer
    and updates the EMA (``stepped`` tells which call did). The same interface as
    ``engine_deepspeed.DeepSpeedTrainStep``.
    """

    def __init__(
        self,
        student: JEPAStudent,
        target_encoder: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedules: Schedules,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        options: StepOptions | None = None,
        grad_accum: int = 1,
    ):
        if grad_accum < 1:
            raise ValueError(f"grad_accum={grad_accum} must be >= 1")
        self.student = student
        self.target_encoder = target_encoder
        self.optimizer = optimizer
        self.schedules = schedules
        self.device = device
        self.amp_dtype = amp_dtype
        self.options = options or StepOptions()
        self.grad_accum = grad_accum
        self.micro = 0  # micro-batches since the last optimizer step
        self.stepped = False
        self.scaler = torch.amp.GradScaler(device.type) if self.options.grad_scaler else None
        self.last_host_loss: float | None = None  # filled only when sync_every_step (authors' habit)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def weights_finite(self) -> torch.Tensor:
        """0-d bool tensor on the device: the student's and the target encoder's weights are finite."""
        return all_finite([*self.student.parameters(), *self.target_encoder.parameters()])

    def __call__(self, images: torch.Tensor, masks: MaskBatch, step: int) -> dict[str, torch.Tensor]:
        opts = self.options
        if self.micro == 0:
            set_lr_wd(self.optimizer, self.schedules.lr_at(step), self.schedules.wd_at(step))
        with self._autocast():
            targets = compute_targets(self.target_encoder, images, masks, fused=opts.fused_gather)
            loss = self.student(images, masks.context, masks.targets, targets)
        self._backward(loss / self.grad_accum if self.grad_accum > 1 else loss)
        self.micro += 1
        self.stepped = self.micro == self.grad_accum
        if self.stepped:
            self.micro = 0
            self._update()
            ema_update(
                self.target_encoder, self.student.encoder, self.schedules.momentum_at(step), fused=opts.fused_ema
            )
        out = {"loss": loss.detach()}
        if opts.sync_every_step:
            self.last_host_loss = float(out["loss"])  # the authors read the loss to the host every step
        return out

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _update(self) -> None:
        """Clip, step and zero the gradients (through the GradScaler when there is one)."""
        opts = self.options
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if opts.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
