"""What the trainer runs between two steps, outside the training time: the caller's ``on_epoch_end``
and the online probe (``train.online_probe``). Their time is returned so that images/s counts
training alone, and a stop signal ends them where they are (the run then saves and stops)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from torch import nn

from ijepa_fast.runtime.errors import ConfigError
from ijepa_fast.train.online_probe import OnlineProbe
from ijepa_fast.train.signals import Interrupted, StopOnSignals


class StepHooks:
    """``run(step)`` after optimizer step ``step`` (counted from 1): the epoch-end callback at the end
    of each epoch, the probe where it is due; returns (seconds spent, the probe's scores or {})."""

    def __init__(
        self,
        steps_per_epoch: int,
        signals: StopOnSignals,
        target_encoder: Callable[[], nn.Module],
        on_epoch_end: Callable[[int], None] | None = None,
        probe: OnlineProbe | None = None,
    ):
        self.steps_per_epoch, self.signals, self.target_encoder = steps_per_epoch, signals, target_encoder
        self.on_epoch_end, self.probe = on_epoch_end, probe

    def probe_due(self, step: int) -> bool:
        """The probe scores after ``step`` (the trainer reads the device and logs there too)."""
        return self.probe is not None and self.probe.due(step)

    def run(self, step: int) -> tuple[float, dict[str, float]]:
        started, scores = time.perf_counter(), {}
        epoch_end = self.on_epoch_end is not None and step % self.steps_per_epoch == 0
        if epoch_end or self.probe_due(step):
            with contextlib.suppress(Interrupted), self.signals.interrupting():  # a signal ends them
                if self.probe_due(step):
                    scores = self.probe(step, self.target_encoder())
                if epoch_end:
                    self.on_epoch_end(step // self.steps_per_epoch)
        return time.perf_counter() - started, scores


def build_hooks(trainer, on_epoch_end: Callable[[int], None] | None) -> StepHooks:
    """The hooks of a ``Trainer`` being built: ``on_epoch_end`` and, when ``online_probe.every`` is
    set, the online probe (its data opened now on rank 0, so that a bad path fails before training)."""
    cfg, probe = trainer.cfg, None
    if cfg.online_probe.every:
        if trainer.engine.shards_target:  # through _agree: every rank stops here and leaves the group

            def refuse() -> None:
                raise ConfigError(
                    f"online_probe.every: not with the {trainer.engine_name} engine here, which shards the target "
                    "encoder over the ranks (run.zero_stage=3, run.engine=fsdp2): rank 0 alone cannot run it"
                )

            trainer._agree(refuse)
        probe = OnlineProbe(cfg, trainer.steps_per_epoch, trainer.run_dir, trainer.is_main)
        trainer._agree(probe.check_data, main_only=True)  # a failure on rank 0 stops every rank
    target = lambda: trainer.engine.target_encoder  # noqa: E731 (the engine's, when called)
    return StepHooks(trainer.steps_per_epoch, trainer.signals, target, on_epoch_end, probe)
