"""Learning-rate, weight-decay and EMA-momentum schedules as pure functions of the step.

The authors' schedules are generators and objects stepped in place, so resuming replays every past
step. Here each value is a closed-form function of the 0-based optimizer step, and ``state_dict``
holds only the constants: resuming at step s needs nothing but s.

Conventions match the authors' code exactly: their LR and WD schedulers increment their counter
before computing, so optimizer step s uses the value at s + 1; their momentum generator yields the
value at s for step s. Their arithmetic too, since float products depend on the order: the LR and
WD schedules span ``int(ipe_scale * epochs * ipe)`` steps (their ``init_opt``), while the momentum
divides by the unrounded ``ipe * epochs * ipe_scale`` (their ``train.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Schedules:
    total_steps: int  # T = int(ipe_scale * epochs * iterations per epoch), the LR and WD span
    warmup_steps: int
    start_lr: float
    lr: float
    final_lr: float
    weight_decay: float
    final_weight_decay: float
    ema_start: float = 0.996
    ema_end: float = 1.0
    momentum_span: float | None = None  # unrounded ipe * epochs * ipe_scale; None: total_steps

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"schedule total_steps={self.total_steps} must be >= 1")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must lie in [0, total_steps={self.total_steps}]")

    @classmethod
    def from_config(cls, optim, steps_per_epoch: int) -> Schedules:
        """From an ``OptimConfig`` and the iterations per epoch (authors: ipe)."""
        ipe = steps_per_epoch
        total = max(int(optim.ipe_scale * optim.epochs * ipe), 1)
        return cls(
            total_steps=total,
            warmup_steps=min(int(optim.warmup_epochs * steps_per_epoch), total),
            start_lr=optim.start_lr,
            lr=optim.lr,
            final_lr=optim.final_lr,
            weight_decay=optim.weight_decay,
            final_weight_decay=optim.final_weight_decay,
            ema_start=optim.ema[0],
            ema_end=optim.ema[1],
            momentum_span=ipe * optim.epochs * optim.ipe_scale,
        )

    def lr_at(self, step: int) -> float:
        """Linear warm-up start_lr -> lr, then cosine lr -> final_lr."""
        s = step + 1
        if s < self.warmup_steps:
            return self.start_lr + (s / max(1, self.warmup_steps)) * (self.lr - self.start_lr)
        progress = (s - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(self.final_lr, self.final_lr + (self.lr - self.final_lr) * cosine)

    def wd_at(self, step: int) -> float:
        """Cosine weight_decay -> final_weight_decay (clamped at the final value past the end)."""
        progress = (step + 1) / self.total_steps
        start, end = self.weight_decay, self.final_weight_decay
        wd = end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(end, wd) if end <= start else min(end, wd)

    def momentum_at(self, step: int) -> float:
        """EMA momentum rising linearly ema_start -> ema_end over ``momentum_span`` steps, held at the
        authors' last value (step int(span)) beyond it."""
        span = self.momentum_span or self.total_steps
        i = min(step, int(span))
        return self.ema_start + i * (self.ema_end - self.ema_start) / span

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> Schedules:
        return cls(**state)
