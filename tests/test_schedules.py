"""Schedules: pure functions of the step equal the authors' stateful schedulers stepped in place."""

from __future__ import annotations

import math

import pytest

from ijepa_fast.config import OptimConfig
from ijepa_fast.train.schedules import Schedules


class AuthorsWarmupCosine:
    """Re-statement of the authors' stateful LR scheduler (counter incremented before use)."""

    def __init__(self, warmup, start_lr, ref_lr, T_max, final_lr):
        self.w, self.s, self.r, self.T, self.f, self._step = warmup, start_lr, ref_lr, T_max, final_lr, 0

    def step(self):
        self._step += 1
        if self._step < self.w:
            return self.s + (self._step / max(1, self.w)) * (self.r - self.s)
        progress = (self._step - self.w) / max(1, self.T - self.w)
        return max(self.f, self.f + (self.r - self.f) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class AuthorsCosineWD:
    def __init__(self, ref_wd, T, final_wd):
        self.r, self.T, self.f, self._step = ref_wd, T, final_wd, 0

    def step(self):
        self._step += 1
        progress = self._step / self.T
        wd = self.f + (self.r - self.f) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(self.f, wd) if self.f <= self.r else min(self.f, wd)


def authors_momentum(ema, ipe, num_epochs, ipe_scale):
    """Their train.py's generator, character for character in its arithmetic."""
    return (
        ema[0] + i * (ema[1] - ema[0]) / (ipe * num_epochs * ipe_scale)
        for i in range(int(ipe * num_epochs * ipe_scale) + 1)
    )


def orders_that_differ() -> list[tuple[int, int, float]]:
    """(ipe, epochs, ipe_scale) where int(ipe_scale * epochs * ipe) (the authors' T_max) differs from
    int(ipe * epochs * ipe_scale): float products depend on the order of multiplication."""
    found = [
        (ipe, epochs, scale)
        for scale in (1.15, 1.3, 0.7)
        for epochs in range(1, 8)
        for ipe in range(1, 60)
        if int(scale * epochs * ipe) != int(ipe * epochs * scale)
    ]
    assert found, "no triple found: widen the search"
    return found[:3]


CASES = [(50, 10, 1.0), (7, 3, 1.25), (1, 1, 1.0), (9, 4, 0.75), *orders_that_differ()]


@pytest.mark.parametrize("ipe,epochs,ipe_scale", CASES)
@pytest.mark.parametrize("warmup", [0, 1])
def test_schedules_equal_the_authors_stepped_schedulers(ipe, epochs, ipe_scale, warmup):
    cfg = OptimConfig(epochs=epochs, warmup_epochs=warmup, ipe_scale=ipe_scale)
    sched = Schedules.from_config(cfg, ipe)
    T = int(ipe_scale * epochs * ipe)  # their init_opt's T_max, in their order
    assert sched.total_steps == T
    lr = AuthorsWarmupCosine(int(warmup * ipe), cfg.start_lr, cfg.lr, T, cfg.final_lr)
    wd = AuthorsCosineWD(cfg.weight_decay, T, cfg.final_weight_decay)
    mom = list(authors_momentum(cfg.ema, ipe, epochs, ipe_scale))
    for step in range(min(ipe * epochs, T)):  # past T (ipe_scale < 1) their generators run dry
        assert sched.lr_at(step) == lr.step()
        assert sched.wd_at(step) == wd.step()
    for step in range(min(ipe * epochs, len(mom))):
        assert sched.momentum_at(step) == mom[step]
    assert sched.momentum_at(10 * T + 5) == mom[-1]  # held at their last value


def test_paper_values_at_the_ends():
    sched = Schedules.from_config(OptimConfig(epochs=300, warmup_epochs=40), 625)
    assert sched.lr_at(0) == pytest.approx(2e-4, rel=1e-2)
    assert sched.lr_at(40 * 625 - 1) == pytest.approx(1e-3)
    assert sched.lr_at(300 * 625 - 1) == pytest.approx(1e-6)
    assert sched.wd_at(300 * 625 - 1) == pytest.approx(0.4)
    assert sched.momentum_at(0) == 0.996 and sched.momentum_at(300 * 625) == pytest.approx(1.0)


def test_resume_needs_no_replay():
    sched = Schedules.from_config(OptimConfig(epochs=4, warmup_epochs=1), 10)
    again = Schedules.from_state_dict(sched.state_dict())
    assert [again.lr_at(s) for s in range(25, 40)] == [sched.lr_at(s) for s in range(25, 40)]


def test_bad_schedule_is_named():
    with pytest.raises(ValueError, match="warmup_steps"):
        Schedules(total_steps=10, warmup_steps=11, start_lr=0, lr=1, final_lr=0, weight_decay=0, final_weight_decay=0)
