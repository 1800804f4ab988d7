"""The I-JEPA training step, written once for every engine.

targets (target encoder on the whole image, normalised, gathered) -> context encoder -> predictor ->
loss -> backward -> optimizer step -> EMA of the target encoder. Whatever owns the weights and the
optimizer (plain PyTorch, DeepSpeed ZeRO) implements ``Engine``; this module owns what is the same
for all of them: the schedules, gradient accumulation, autocast and the EMA. The step returns device
tensors and reads nothing back, unless the authors' habits are switched on to measure them; asked to
(on logging steps), it also returns the collapse monitors' summary of this rank's target features.

``sync_every_step`` (on in the ``authors`` preset) makes the step wait for the device as the
authors' loop does every step (facebookresearch/ijepa at 52c1ae9):

- the norm of every encoder weight's gradient read to the host, one ``float`` at a time, after the
  optimizer step and before the gradients are zeroed: ``grad_logger`` (src/utils/logging.py:78-92,
  ``float(torch.norm(p.grad.data))`` at :84) called at src/train.py:329, between ``scaler.step`` /
  ``scaler.update`` (:324-325) and ``optimizer.zero_grad()`` (:330);
- the loss read to the host after the EMA: ``float(loss)``, src/train.py:338;
- a whole-device synchronize at the end of the step: ``gpu_timer`` (src/utils/logging.py:25,
  ``torch.cuda.synchronize()``) wraps every step at src/train.py:339.

With a GradScaler (``speed.grad_scaler``) and the authors' unfused AdamW its ``step`` reads the
found-inf flag to the host as well, as the authors' ``scaler.step(optimizer)`` does; a fused AdamW
takes the flag on the device (``engines.plain``).

fp16 (``run.dtype=fp16``, for GPUs without bf16) runs the forward under fp16 autocast, the loss in
fp32 (``train.loss``), and always with a GradScaler; weights, gradients after unscaling, optimizer
state and the EMA stay fp32. A step whose gradients overflow is the scaler's to skip (its scale
halves): expected, so the run goes on, but the EMA skips it too (``Engine.overflow``), so the target
encoder moves only when the context encoder did. With a fused AdamW this adds no host sync.

A step whose loss or gradients are not finite changes nothing, decided on the device: one 0-d flag
(the loss averaged over ranks, and the gradient norm the engine has or takes) makes the engine skip
the optimizer step (an engine that can: ``Engine.skips_non_finite``) and the EMA leave the target
encoder as it was. The flag sticks: every later step is skipped too, so the weights stay those
before the first bad step until the trainer reads the flag (``step_finite`` in the output) at its
next logging point and stops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ijepa_fast.masks.sampler import MaskBatch
from ijepa_fast.models import fp8
from ijepa_fast.models.ijepa import JEPAStudent, compute_targets
from ijepa_fast.models.target_copy import Bf16TargetCopy
from ijepa_fast.runtime.device import autocast, synchronize
from ijepa_fast.train.metrics import feature_summary
from ijepa_fast.train.optim import set_lr_wd
from ijepa_fast.train.schedules import Schedules

PhaseMark = Callable[[str], None]
"""Called with a phase name as that phase of the step begins (the profiler's clock)."""


def no_mark(phase: str) -> None:
    """The default phase mark: nothing."""


class Engine(Protocol):
    """What the step needs from whatever owns the student's weights and its optimizer."""

    student: JEPAStudent  # the trained modules (context encoder + predictor)
    target_encoder: nn.Module
    optimizer: torch.optim.Optimizer  # its param_groups take the schedules' lr and wd
    device: torch.device
    # step(finite) false leaves the weights and optimizer state as they were (else: applied anyway)
    skips_non_finite: bool
    # after a step with a loss scaler: 0-d bool device tensor, its gradients overflowed and the scaler
    # skipped the optimizer step; None without one. Read only under fp16 autocast.
    overflow: torch.Tensor | None
    # each rank holds only a shard of the target encoder (ZeRO-3, FSDP2): what needs all of it on
    # one rank (the bf16 copy, the online probe on rank 0) is off or refused
    shards_target: bool

    def forward(self, images: torch.Tensor, masks: MaskBatch, targets: torch.Tensor, mark: PhaseMark) -> torch.Tensor:
        """The student's loss on one micro-batch."""

    def target_forward(self, images: torch.Tensor) -> torch.Tensor:
        """The target encoder on whole images: [B, 3, S, S] -> [B, N, D]."""

    def backward(self, loss: torch.Tensor) -> None:
        """Add the gradients of ``loss`` (already divided by the accumulation count)."""

    def step(self, finite: torch.Tensor) -> torch.Tensor:
        """Clip, step the optimizer and zero the gradients: the end of one optimizer step.

        ``finite``: 0-d bool device tensor, the same on every rank, false to skip this step. Returns
        it and-ed with "the gradients are finite": where false, the optimizer step was skipped on the
        device (with ``skips_non_finite``). No host sync.
        """

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(target tensors, source tensors) the EMA updates in place: full parameters or local shards."""

    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` averaged over data-parallel ranks (itself on one process); no host sync."""

    def weights_finite(self) -> torch.Tensor:
        """0-d bool device tensor, the same on every rank: the student's and target's weights are finite."""

    def save(self, run_dir: Path, step: int, meta: dict, keep: int) -> Path | None:
        """Checkpoint the state after ``step`` optimizer steps; returns what ijepa-eval reads.

        Optional beside it (``train.checkpointing`` looks for it; None where the engine writes in
        the background itself): ``save_async(run_dir, step, meta, keep) -> (path, write)`` takes a
        host copy of the state and returns the write to run in the background."""

    def checkpoint_bytes(self) -> int:
        """About how many bytes one ``save`` writes to the run folder's disk (the disk-space check)."""

    @staticmethod
    def checkpoint_folders(run_dir: Path, is_main: bool) -> list[tuple[Path, str]]:
        """(folder, what it is) of every folder this process writes checkpoints to."""

    def finish_saves(self) -> None:
        """Return once every checkpoint ``save`` started is written (an engine may write in the
        background); raise the error a background write ended with."""

    def load(self, run_dir: Path) -> dict | None:
        """Restore the newest checkpoint of ``run_dir``; returns its ``meta`` (with ``step``) or None."""


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """0-d bool tensor on the tensors' device: no element of any of them is inf or nan. No host sync.

    One fused max-|x| reduction (``_foreach_norm`` with ord=inf propagates nan): unlike a 2-norm it
    does not overflow on large finite weights.
    """
    tensors = [t.detach() for t in tensors if t.numel()]  # the inf-norm of an empty tensor is undefined
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors, ord=float("inf")))).all()


@torch.no_grad()
def ema_update(
    targets: list[torch.Tensor],
    sources: list[torch.Tensor],
    momentum: float,
    fused: bool = True,
    apply: torch.Tensor | None = None,
    bf16_out: list[torch.Tensor | None] | None = None,
) -> None:
    """target = m * target + (1 - m) * source, pair by pair, in place; where ``apply`` (0-d bool
    device tensor; None: true) is false, nothing changes, decided on the device. ``bf16_out[i]``
    (when given and not None) receives target i's new value in bf16, in the same pass when fused."""
    if fused:
        from ijepa_fast.kernels.ema import ema_update_

        ema_update_(targets, sources, momentum, bf16_out=bf16_out, apply=apply)
        return
    if apply is not None:  # the same per-parameter update, its result selected on the device
        from ijepa_fast.kernels.ema import ema_update_reference

        ema_update_reference(targets, sources, momentum, bf16_out=bf16_out, apply=apply)
        return
    # the authors' loop, one mul_ and one add_ per parameter (facebookresearch/ijepa src/train.py:333-336)
    for t, s in zip(targets, sources):
        t.mul_(momentum).add_((1.0 - momentum) * s.detach().to(t.dtype))
    for t, o in zip(targets, bf16_out or ()):
        if o is not None:
            o.copy_(t)


@dataclass
class StepOptions:
    fused_ema: bool = True  # False: the authors' per-parameter mul_/add_ loop
    fused_gather: bool = True  # False: the authors' expand + gather + cat (targets; the models take their own)
    # True: the authors' per-step host syncs, for measuring their cost (the module docstring)
    sync_every_step: bool = False


class TrainStep:
    """``step(images [B,3,S,S], masks, step) -> {"loss": 0-d device tensor}`` over an ``Engine``.

    With ``grad_accum`` = k > 1 call it once per micro-batch, k times with the same optimizer
    ``step``: each call adds the gradients of its loss / k, and the k-th steps the optimizer and
    updates the EMA (``stepped`` tells which call did; its output also holds ``step_finite``, the
    0-d bool ``finite``: this step and every one before it had finite losses and gradients, so the
    updates were applied). ``mark`` receives the phase names in order
    (target_fwd, context_fwd, predictor_fwd, backward, optimizer, ema, sync) for the profiler.
    With ``monitor`` the output also holds ``metrics.feature_summary`` of the target encoder's
    features [B, N, D] of this micro-batch (the step's first one): device tensors, no host sync.
    With ``target_copy`` (``speed.bf16_target_copy``) the target forward reads its bf16 weights and
    the EMA writes them beside the fp32 ones (with the same skip flag).
    """

    def __init__(
        self,
        engine: Engine,
        schedules: Schedules,
        amp_dtype: torch.dtype | None,
        options: StepOptions | None = None,
        grad_accum: int = 1,
        target_copy: Bf16TargetCopy | None = None,
    ):
        if grad_accum < 1:
            raise ValueError(f"grad_accum={grad_accum} must be >= 1")
        self.engine = engine
        self.schedules = schedules
        self.amp_dtype = amp_dtype
        self.options = options or StepOptions()
        self.grad_accum = grad_accum
        self.target_copy = target_copy
        self._micro = 0  # micro-batches since the last optimizer step
        self.stepped = False
        self.finite = torch.ones((), dtype=torch.bool, device=engine.device)  # sticky: see the module docstring
        # speed.fp8_target: the float8 weights follow the fp32 ones once per step, after the EMA, and
        # before the first step (the weights may have been loaded from a checkpoint since they were built)
        self._float8 = fp8.float8_linears(engine.target_encoder)
        self._float8_stale = bool(self._float8)
        self._losses_finite = self.finite  # the micro-batch losses of the current step
        self.last_host_loss: float | None = None  # filled only with sync_every_step
        self.last_grad_norms: list[float] = []  # filled only with sync_every_step
        # The authors read the gradient norms between the optimizer step and zero_grad, both inside
        # engine.step(): a post-step hook puts the reads there. An optimizer without hooks
        # (DeepSpeed's) gets them just before its step.
        self._norms_after_step = False
        if self.options.sync_every_step and hasattr(engine.optimizer, "register_step_post_hook"):
            engine.optimizer.register_step_post_hook(self._read_grad_norms)
            self._norms_after_step = True

    @property
    def student(self) -> JEPAStudent:
        return self.engine.student

    @property
    def target_encoder(self) -> nn.Module:
        return self.engine.target_encoder

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def __call__(
        self, images: torch.Tensor, masks: MaskBatch, step: int, mark: PhaseMark = no_mark, monitor: bool = False
    ) -> dict[str, torch.Tensor]:
        engine, opts = self.engine, self.options
        summary: dict[str, torch.Tensor] = {}
        target_forward = engine.target_forward if self.target_copy is None else self.target_copy
        if self._micro == 0:
            set_lr_wd(engine.optimizer, self.schedules.lr_at(step), self.schedules.wd_at(step))
            if monitor:
                target_forward = _summarising(target_forward, summary)
        mark("target_fwd")
        if self._float8_stale:
            fp8.requantize(self._float8)
            self._float8_stale = False
        with autocast(self.device, self.amp_dtype):
            with torch.no_grad():
                targets = compute_targets(target_forward, images, masks, fused=opts.fused_gather)
            loss = engine.forward(images, masks, targets, mark)
        mark("backward")
        engine.backward(loss / self.grad_accum if self.grad_accum > 1 else loss)
        out = {"loss": engine.mean_over_ranks(loss.detach()), **summary}
        # The mean over ranks: one rank's non-finite loss makes every rank's flag false.
        loss_finite = torch.isfinite(out["loss"])
        self._losses_finite = loss_finite if self._micro == 0 else self._losses_finite & loss_finite
        self._micro += 1
        self.stepped = self._micro == self.grad_accum
        if self.stepped:
            self._micro = 0
            mark("optimizer")
            if opts.sync_every_step and not self._norms_after_step:
                self._read_grad_norms()
            # with sync_every_step, the gradient norms are read inside (the post-step hook)
            self.finite = engine.step(self.finite & self._losses_finite)
            mark("ema")
            momentum = self.schedules.momentum_at(step)
            targets, sources = engine.ema_pairs()
            copies = None if self.target_copy is None else self.target_copy.outputs_for(targets)
            apply = self.finite
            if self.amp_dtype == torch.float16 and engine.overflow is not None:  # fp16: see the module docstring
                apply = apply & ~engine.overflow
            ema_update(targets, sources, momentum, fused=opts.fused_ema, apply=apply, bf16_out=copies)
            fp8.requantize(self._float8)
            out["step_finite"] = self.finite
        if opts.sync_every_step:
            mark("sync")
            self.last_host_loss = float(out["loss"])
            synchronize(self.device)
        return out

    def _read_grad_norms(self, *hook_args) -> None:
        self.last_grad_norms = read_grad_norms(self.student.encoder)


def _summarising(target_forward: Callable, summary: dict) -> Callable:
    """``target_forward`` that also puts ``feature_summary`` of the features it returns into ``summary``."""

    def forward(images: torch.Tensor) -> torch.Tensor:
        features = target_forward(images)  # (B, N, D)
        summary.update(feature_summary(features))
        return features

    return forward


def read_grad_norms(encoder: nn.Module) -> list[float]:
    """The norm of every weight's gradient read to the host, one tensor at a time, as the authors'
    ``grad_logger`` (biases and 1-D parameters skipped): the host waits for the device once per
    weight, 129 times for ViT-H/14."""
    norms = []
    for name, p in encoder.named_parameters():
        if p.grad is not None and not (name.endswith(".bias") or p.ndim == 1):
            norms.append(float(torch.norm(p.grad)))
    return norms
