"""The plain PyTorch engine: one process, an AdamW over the student, checkpoints as one file.

A checkpoint (``ijepa_fast.io.checkpoint``'s format) holds the ``encoder``, ``predictor`` and
``target_encoder`` state dicts, ``opt`` (and ``scaler`` with a GradScaler), the trainer's metadata
and every RNG state; it is written atomically into ``run_dir/checkpoints``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ijepa_fast.io import checkpoint as ckpt
from ijepa_fast.io.async_save import host_copy, tensor_bytes
from ijepa_fast.masks.sampler import MaskBatch
from ijepa_fast.models.ijepa import JEPAStudent
from ijepa_fast.train.step import PhaseMark, all_finite


class PlainEngine:
    """Implements ``step.Engine`` with a torch optimizer, optional gradient clipping and GradScaler.

    A fused optimizer (torch's fused AdamW) skips a non-finite step on the device: it takes the
    ``found_inf`` flag GradScaler hands fused optimizers, and on 1 leaves the weights, moments and
    step counts as they were. Other optimizers keep their step counts on the host, so their step
    is applied whatever the flag says (``skips_non_finite`` false).

    With a GradScaler (``speed.grad_scaler``, and always under ``run.dtype=fp16``) ``overflow`` is,
    after each step, the scaler's 0-d bool "this step's gradients were not finite, so it skipped the
    optimizer step (and halved its scale)", read from the flag its ``unscale_`` already computed:
    no extra pass over the gradients, no host sync. What the scaler costs in host syncs: with a fused
    optimizer (the default) none, since ``GradScaler.step`` hands its flag to the optimizer as
    ``found_inf`` and ``update`` adjusts the scale on the device; with any other optimizer one per
    step, ``GradScaler.step`` reading the flag to decide whether to call the optimizer at all.
    """

    name = "plain"
    shards_target = False  # every rank holds the whole target encoder (step.Engine)

    def __init__(
        self,
        student: JEPAStudent,
        target_encoder: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        grad_clip: float = 0.0,
        grad_scaler: bool = False,
    ):
        self.student = student
        self.target_encoder = target_encoder
        self.optimizer = optimizer
        self.device = device
        self.grad_clip = grad_clip
        self.scaler = torch.amp.GradScaler(device.type) if grad_scaler else None
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self.skips_non_finite = bool(optimizer.defaults.get("fused"))
        self._skip: torch.Tensor | None = None  # this step's found_inf (0. or 1.), for the pre-step hook
        self.overflow: torch.Tensor | None = None  # with a GradScaler: see the class docstring
        self._staged: dict | None = None  # the last host copy of a background save, reused as buffers
        if self.skips_non_finite:
            optimizer.register_step_pre_hook(self._pass_skip)

    # ------------------------------------------------------------------ the step's calls
    def forward(self, images: torch.Tensor, masks: MaskBatch, targets: torch.Tensor, mark: PhaseMark) -> torch.Tensor:
        return self.student(images, masks.context, masks.targets, targets, mark=mark)

    def target_forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.target_encoder(images)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, finite: torch.Tensor) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            self.overflow = self._scaler_found_inf()
        norm = torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip) if self.grad_clip > 0 else None
        # With a GradScaler, non-finite gradients are its own to skip (and to lower its scale for):
        # expected, not a reason to stop. Without one, they fail the step like a non-finite loss.
        if self.scaler is None:
            finite = finite & self._grads_finite(norm)
        if self.skips_non_finite:
            self._skip = (~finite).float()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
            self.optimizer.__dict__.pop("found_inf", None)  # ours, set by _pass_skip for this step only
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def _scaler_found_inf(self) -> torch.Tensor:
        """0-d bool device tensor: the scaler's ``unscale_`` found a non-finite gradient. Its per-device
        flags live in GradScaler's per-optimizer state (a private method gives them) until ``update``;
        tests/test_step.py fails if that changes."""
        flags = self.scaler._found_inf_per_device(self.optimizer).values()
        return torch.stack([f.to(self.device).reshape(()) for f in flags]).sum() > 0

    def _grads_finite(self, norm: torch.Tensor | None) -> torch.Tensor:
        """0-d bool: the gradients are finite (from their clipping norm, when there is one)."""
        return torch.isfinite(norm) if norm is not None else all_finite(self._grads())

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self._params if p.grad is not None]

    def _pass_skip(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        """Step pre-hook: hand this step's skip flag to the fused optimizer as its ``found_inf``,
        joined with a GradScaler's (set on the optimizer just before its step, removed after)."""
        scalers = getattr(optimizer, "found_inf", None)
        optimizer.found_inf = self._skip if scalers is None else torch.maximum(scalers, self._skip)

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return list(self.target_encoder.parameters()), list(self.student.encoder.parameters())

    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def weights_finite(self) -> torch.Tensor:
        return all_finite([*self.student.parameters(), *self.target_encoder.parameters()])

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def checkpoint_folders(run_dir: Path, is_main: bool) -> list[tuple[Path, str]]:
        """(folder, what it is) of every folder this process writes checkpoints to."""
        return [(run_dir / "checkpoints", "the checkpoints folder")] if is_main else []

    @staticmethod
    def latest_step(run_dir: Path) -> int | None:
        """The step of the newest checkpoint file in ``run_dir`` (None: there is none)."""
        found = ckpt.list_checkpoints(run_dir / "checkpoints")
        return found[-1][0] if found else None

    @staticmethod
    def saved_ranks(run_dir: Path) -> int | None:
        """The number of processes that wrote the newest checkpoint (one; None: there is none)."""
        return None if PlainEngine.latest_step(run_dir) is None else 1

    def state_dict(self) -> dict:
        state = {
            "encoder": self.student.encoder.state_dict(),
            "predictor": self.student.predictor.state_dict(),
            "target_encoder": self.target_encoder.state_dict(),
            "opt": self.optimizer.state_dict(),
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.student.encoder.load_state_dict(state["encoder"])
        self.student.predictor.load_state_dict(state["predictor"])
        self.target_encoder.load_state_dict(state["target_encoder"])
        self.optimizer.load_state_dict(state["opt"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def save(self, run_dir: Path, step: int, meta: dict, keep: int) -> Path:
        state = {**self.state_dict(), **meta, "rng": ckpt.rng_state()}
        return ckpt.save_checkpoint(Path(run_dir) / "checkpoints", state, step, keep)

    def save_async(self, run_dir: Path, step: int, meta: dict, keep: int) -> tuple[Path, Callable[[], Path]]:
        """Copy the state to host memory now; return (the checkpoint's path, the write that ``save``
        does, to run in the background on that copy). Call it again only once that write has ended."""
        # the previous copy's write has ended (the caller joins it first): its buffers are reused
        state = host_copy({**self.state_dict(), **meta, "rng": ckpt.rng_state()}, into=self._staged)
        self._staged = state
        folder = Path(run_dir) / "checkpoints"
        return folder / ckpt.checkpoint_name(step), lambda: ckpt.save_checkpoint(folder, state, step, keep)

    def checkpoint_bytes(self) -> int:
        """About how many bytes one checkpoint takes: the state's tensors, with AdamW's two moments
        counted for parameters that have none yet (before the first step)."""
        unstepped = [p for p in self._params if not self.optimizer.state.get(p)]
        return tensor_bytes(self.state_dict()) + sum(2 * p.numel() * p.element_size() for p in unstepped)

    def finish_saves(self) -> None:
        """Nothing to wait for: ``save`` returns once the checkpoint is written."""

    def load(self, run_dir: Path, check: Callable[[dict], None] | None = None) -> dict | None:
        """Restore the newest loadable checkpoint; ``check(state)`` may refuse it before anything
        is applied. Returns the checkpoint (its metadata included) or None when there is none."""
        state = ckpt.load_latest(Path(run_dir) / "checkpoints")
        if state is None:
            return None
        if check is not None:
            check(state)
        self.load_state_dict(state)
        ckpt.set_rng_state(state["rng"])
        return state
