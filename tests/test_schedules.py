"""Schedules: pure functions of the step equal the authors' stateful schedulers stepped in place."""

from __future__ import annotations

import math

import pytest

from ijepa_fast.config import OptimConfig
from ijepa_fast.schedules import Schedules


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
        wd = self.f + (self.r - self.f) * 0.5 * (1.0 + math.cos(math.pi * self._step / self.T))
        return max(self.f, wd) if self.f <= self.r else min(self.f, wd)


def authors_momentum(ema, T):
    return (ema[0] + i * (ema[1] - ema[0]) / T for i in range(T + 1))


@pytest.mark.parametrize("ipe,epochs,warmup,ipe_scale", [(50, 10, 2, 1.0), (7, 3, 0, 1.25), (1, 1, 1, 1.0)])
def test_schedules_equal_the_authors_stepped_schedulers(ipe, epochs, warmup, ipe_scale):
    cfg = OptimConfig(epochs=epochs, warmup_epochs=warmup, ipe_scale=ipe_scale)
    sched = Schedules.from_config(cfg, ipe)
    T = int(ipe * epochs * ipe_scale)
    lr = AuthorsWarmupCosine(warmup * ipe, cfg.start_lr, cfg.lr, T, cfg.final_lr)
    wd = AuthorsCosineWD(cfg.weight_decay, T, cfg.final_weight_decay)
    mom = authors_momentum(cfg.ema, T)
    for step in range(ipe * epochs):
        assert sched.lr_at(step) == pytest.approx(lr.step(), rel=1e-12, abs=0)
        assert sched.wd_at(step) == pytest.approx(wd.step(), rel=1e-12, abs=0)
        assert sched.momentum_at(step) == pytest.approx(next(mom), rel=1e-12, abs=0)


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
