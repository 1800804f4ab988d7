"""Every patch of a DeepSpeed internal the engine relies on, each pinned to the DeepSpeed release
it was written against (``DEEPSPEED_VERSION``, read from that release's source).

Each ``Patch`` names the DeepSpeed functions it replaces, wraps or relies on the internals of
(``tests/test_deepspeed_patches.py`` holds the sha256 of each one's source in that release and
fails when the installed DeepSpeed's differs). Applied on another release, a patch the engine
cannot do without refuses (``DeepSpeedVersionError``, one line naming the patch and both
versions); the others warn (``DeepSpeedVersionWarning``) and say what the engine does instead.

- ``NO_NORM_CHECKS``: no step reads the device from the host. The ZeRO 1-3 optimizers check the
  global gradient norm with ``bool()`` of a device tensor (``if self.overflow`` follows), whatever
  DeepSpeed's config says; while ``no_norm_checks`` is active every tensor norm passes and goes to
  the step's finite flag instead.
- ``FOUND_INF_HAND_OFF``: a non-finite step is skipped on the device when torch's AdamW inside is
  fused (the generated config's default): the flag (the step's loss flag and the norm above; at
  stage 0, the all-reduced gradients) becomes the fused AdamW's ``found_inf``, which leaves every
  rank's weights, moments and step counts as they were. DeepSpeed's own counters (``global_steps``)
  still count the step. Any other optimizer (ZeRO-Offload's CPU Adam, a non-fused AdamW) applies it;
  the trainer stops at its next read of the loss either way (``FiniteStep``).
- ``SAFE_CHECKPOINT_FILES``: every file DeepSpeed reads back goes through ``checkpoint.load_file``
  (weights only; DeepSpeed's own loader unpickles in full), and torch's file engine saves atomically.
- ``WEIGHTS_ONLY_UNIVERSAL``: converting a checkpoint to DeepSpeed's universal format and loading it
  read every file weights-only too (they call ``torch.load`` directly).
- ``UNIVERSAL_GROUPS``: after a universal load, each parameter group keeps its own settings and
  AdamW step count.
"""

from __future__ import annotations

import contextlib
import warnings
from argparse import Namespace
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ijepa_fast.io import checkpoint as ckpt
from ijepa_fast.train.step import all_finite

DEEPSPEED_VERSION = "0.19.8"
_SOURCE = "ijepa_fast/engines/deepspeed/patches.py"


class DeepSpeedVersionError(ValueError):
    """The installed DeepSpeed is not the release a patch the engine needs was written against."""


class DeepSpeedVersionWarning(UserWarning):
    """The installed DeepSpeed is not the release an optional patch was written against."""


def installed_version() -> str:
    """The installed DeepSpeed's release (a local build's ``+suffix`` dropped)."""
    import deepspeed

    return str(deepspeed.__version__).split("+")[0]


@dataclass(frozen=True)
class Patch:
    """A patch of DeepSpeed internals: ``relies_on`` names (qualified) each DeepSpeed function,
    method or class it replaces, wraps or relies on the internals of, as they are in
    ``DEEPSPEED_VERSION``. ``required``: another release refuses (else it warns, ``instead`` saying
    what the engine does then)."""

    name: str
    relies_on: tuple[str, ...]
    required: bool
    instead: str = ""

    def written_for_installed(self) -> bool:
        """True on ``DEEPSPEED_VERSION``; otherwise raises (``required``) or warns and returns False."""
        installed = installed_version()
        if installed == DEEPSPEED_VERSION:
            return True
        message = (
            f"DeepSpeed patch {self.name} was written against deepspeed {DEEPSPEED_VERSION}, "
            f"this is deepspeed {installed}: install deepspeed=={DEEPSPEED_VERSION}, or re-check "
            f"{', '.join(self.relies_on)} against {installed} in {_SOURCE}"
        )
        if self.required:
            raise DeepSpeedVersionError(message)
        warnings.warn(f"{message}; {self.instead}", DeepSpeedVersionWarning, stacklevel=3)
        return False


# ----------------------------------------------------------------------------- host syncs

# Required: the step's non-finite flag takes the gradient norm from here. Should DeepSpeed move its
# check, the patch would silently not apply, and every step would read the device again and skip a
# non-finite one on the host, without the flag saying so.
NO_NORM_CHECKS = Patch(
    "no_norm_checks",
    (
        "deepspeed.runtime.utils.is_invalid_grad_norm",
        "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer.step",
        "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer.unscale_and_clip_grads",
        "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3.step",
    ),
    required=True,
)


@contextlib.contextmanager
def no_norm_checks(on_norm: Callable[[torch.Tensor], None] | None = None) -> Iterator[None]:
    """While active, DeepSpeed's ZeRO optimizers take every gradient norm as valid instead of reading
    it to the host: their ``is_invalid_grad_norm`` is ``bool()`` of a device tensor, called once per
    step (``step`` of stage_1_and_2 and of stage3) and once per parameter group when clipping
    (stage_1_and_2's ``unscale_and_clip_grads``), whatever ``bf16.check_grad_overflow`` says. Each
    device norm goes to ``on_norm`` instead (before the optimizer steps), which may skip the step on
    the device; otherwise a non-finite norm clips the gradients to non-finite values, as in the plain
    engine, and the trainer stops at its next read of the loss. Numbers (not tensors) are still checked."""
    NO_NORM_CHECKS.written_for_installed()
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    checked = stage_1_and_2.is_invalid_grad_norm  # the same function in both modules

    def device_norms_pass(norm: Any) -> bool:
        if not torch.is_tensor(norm):
            return checked(norm)
        if on_norm is not None:
            on_norm(norm)
        return False

    modules = (stage_1_and_2, stage3)
    saved = [m.is_invalid_grad_norm for m in modules]
    for m in modules:
        m.is_invalid_grad_norm = device_norms_pass
    try:
        yield
    finally:
        for m, fn in zip(modules, saved):
            m.is_invalid_grad_norm = fn


# Optional: without it the engine runs as it does with any non-fused optimizer. Applied on a
# DeepSpeed that steps its inner optimizer differently, a wrong found_inf would skip good steps.
FOUND_INF_HAND_OFF = Patch(
    "found_inf_hand_off",
    (
        "deepspeed.runtime.engine.DeepSpeedEngine.get_optimizer_configuration",
        "deepspeed.runtime.engine.DeepSpeedEngine._take_model_step",
        "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer._optimizer_step",
        "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3._optimizer_step",
    ),
    required=False,
    instead="a non-finite step is applied, as with a non-fused optimizer, and the trainer stops at its "
    "next read of the loss",
)


class FiniteStep:
    """DeepSpeed's ``engine.step()`` with the step's finite flag carried through it on the device:
    ANDed with the ZeRO 1-3 gradient norm (``no_norm_checks``) and, when the torch optimizer
    DeepSpeed steps is a fused AdamW (``skips_non_finite``), handed to it as ``found_inf``."""

    def __init__(self, torch_optimizer: torch.optim.Optimizer, zero_stage: int):
        self._optimizer = torch_optimizer
        self._zero_stage = zero_stage
        self._finite: torch.Tensor | None = None  # the step's flag while engine.step() runs
        fused = bool(getattr(torch_optimizer, "defaults", {}).get("fused"))
        self.skips_non_finite = fused and FOUND_INF_HAND_OFF.written_for_installed()
        if self.skips_non_finite:
            torch_optimizer.register_step_pre_hook(self._pass_skip)

    def step(self, engine: Any, finite: torch.Tensor) -> torch.Tensor:
        """``engine.step()`` (unmanaged accumulation: reduce, clip, step, zero); returns ``finite``
        ANDed with what the step found."""
        self._finite = finite
        with no_norm_checks(self._and_valid_norm):
            engine.step()
        self._optimizer.__dict__.pop("found_inf", None)  # ours, set by _pass_skip for this step only
        finite, self._finite = self._finite, None
        return finite

    def _and_valid_norm(self, norm: torch.Tensor) -> None:
        """ZeRO 1-3: the global gradient norm, the same on every rank (DeepSpeed makes a non-finite
        one inf or -1)."""
        self._finite = self._finite & (torch.isfinite(norm) & (norm >= 0)).all()

    def _pass_skip(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        """Step pre-hook of the fused AdamW (once per parameter group under ZeRO 1-2): this step's
        flag as its ``found_inf``. At stage 0 no ZeRO norm exists: the gradients it is about to
        apply, already all-reduced, are checked here."""
        if self._zero_stage == 0:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self._finite = self._finite & all_finite(grads)
        optimizer.found_inf = (~self._finite).float()


# ----------------------------------------------------------------------------- safe loading

# Required: without it DeepSpeed unpickles every checkpoint file in full (a planted object runs).
SAFE_CHECKPOINT_FILES = Patch(
    "safe_checkpoint_files",
    (
        "deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine.TorchCheckpointEngine.load",
        "deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine.TorchCheckpointEngine.save",
        "deepspeed.runtime.engine.DeepSpeedEngine._configure_checkpointing",
        "deepspeed.runtime.engine.DeepSpeedEngine._load_checkpoint",
        "deepspeed.runtime.engine.DeepSpeedEngine._get_all_zero_checkpoint_state_dicts",
        "deepspeed.runtime.engine.DeepSpeedEngine._save_checkpoint",
        "deepspeed.runtime.engine.DeepSpeedEngine._save_zero_checkpoint",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    ),
    required=True,
)


def deepspeed_safe_globals() -> list[type]:
    """The classes DeepSpeed pickles into ZeRO 0-3 checkpoints (fp32 and bf16) besides tensors and
    containers: plain records, rebuilt from data without running code. Found by loading real
    checkpoints of each stage with ``weights_only=True``; any other object is refused."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class _CheckpointFiles:
    """A DeepSpeed checkpoint engine whose ``load`` is ``checkpoint.load_file`` and, for torch's own
    file engine, whose ``save`` is ``checkpoint.atomic_torch_save``; everything else (commit, other
    writers configured through ``run.ds_config``) is the wrapped engine's.

    DeepSpeed's own ``load`` calls ``torch.load(weights_only=False)``, which runs whatever a planted
    object asks for. Its ``save`` writes in place through torch's C++ writer: a failed write (a full
    disk) leaves a truncated file and raises a RuntimeError that names no file. Saved atomically,
    each file is whole or absent, and a failed write is an OSError naming it."""

    def __init__(self, inner: Any):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        self._inner = inner
        self._allowed = deepspeed_safe_globals()
        self._atomic_saves = type(inner) is TorchCheckpointEngine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        # resuming has no override: DeepSpeed and this package store only plain records
        return ckpt.load_file(path, allowed=self._allowed, map_location=map_location, override=None)

    def save(self, state_dict: Any, path: str) -> None:  # DeepSpeed passes both by keyword
        if self._atomic_saves:
            ckpt.atomic_torch_save(state_dict, Path(path))
        else:
            self._inner.save(state_dict, path)


def safe_checkpoint_files(engine: Any) -> Any:
    """``engine`` (a DeepSpeed engine) with its checkpoint engine wrapped by ``_CheckpointFiles``."""
    SAFE_CHECKPOINT_FILES.written_for_installed()
    engine.checkpoint_engine = _CheckpointFiles(engine.checkpoint_engine)
    return engine


# ----------------------------------------------------------------------------- universal checkpoints

# Required: the conversion and the universal load call torch.load(weights_only=False) themselves;
# should they read through anything else, a planted object would run.
WEIGHTS_ONLY_UNIVERSAL = Patch(
    "weights_only_universal",
    (
        "deepspeed.checkpoint.ds_to_universal.main",
        "deepspeed.checkpoint.universal_checkpoint.load_hp_checkpoint_state",
        "deepspeed.runtime.base_optimizer.ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir",
        "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3",
        "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state",
        "deepspeed.runtime.engine.DeepSpeedEngine.load_universal_checkpoint",
    ),
    required=True,
)


@contextlib.contextmanager
def weights_only_torch_load(allowed: list[type]) -> Iterator[None]:
    """While active, ``torch.load(f, map_location=...)`` is ``checkpoint.load_file`` (weights only,
    ``allowed`` classes besides tensors and containers, no override): a file holding any other object
    raises ``checkpoint.UntrustedCheckpointError`` instead of being unpickled."""
    real = torch.load

    def load(f: Any, map_location: Any = None, *_args: Any, **_kwargs: Any) -> Any:
        return ckpt.load_file(f, allowed=allowed, map_location=map_location or "cpu", override=None)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def run_ds_to_universal(tag_dir: Path, out_dir: Path, allowed: list[type]) -> None:
    """DeepSpeed's ``ds_to_universal`` script, in this process: the ZeRO checkpoint ``tag_dir`` (any
    stage 1-3) written as a universal checkpoint into ``out_dir``, every file read weights-only."""
    WEIGHTS_ONLY_UNIVERSAL.written_for_installed()
    from deepspeed.checkpoint import ds_to_universal

    args = Namespace(
        input_folder=str(tag_dir),
        output_folder=str(out_dir),
        num_extract_workers=1,  # in this process: the weights-only torch.load reaches every read
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # no tensor parallelism: the version DeepSpeed expects, nothing else
    )
    with weights_only_torch_load(allowed), contextlib.redirect_stdout(None):
        ds_to_universal.main(args)


@contextlib.contextmanager
def universal_checkpoint_load(engine: Any, allowed: list[type]) -> Iterator[None]:
    """While active, ``engine.load_checkpoint`` reads a universal checkpoint (DeepSpeed reads the
    flag only while it loads), weights-only."""
    WEIGHTS_ONLY_UNIVERSAL.written_for_installed()
    config = engine._config
    config.load_universal_checkpoint = True
    try:
        with weights_only_torch_load(allowed):
            yield
    finally:
        config.load_universal_checkpoint = False


# Optional, and applied on any release: each group's own settings and step count are right whatever
# DeepSpeed's load did, so on another release it only warns that the fix-up may no longer be needed.
UNIVERSAL_GROUPS = Patch(
    "universal_groups",
    (
        "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3",
    ),
    required=False,
    instead="each group's settings and step count are restored all the same",
)


@contextlib.contextmanager
def groups_kept_through_universal_load(zero_optimizer: Any) -> Iterator[None]:
    """ZeRO-3's universal load gives every parameter group the first group's settings (which groups
    decay, above all) and one shared ``step`` tensor: each group gets its own back when the load
    returns (the schedules set lr and weight decay at the next step anyway)."""
    UNIVERSAL_GROUPS.written_for_installed()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in zero_optimizer.param_groups]
    yield
    for group, settings in zip(zero_optimizer.param_groups, groups, strict=True):
        group.update(settings)
    _own_step_counts(zero_optimizer.optimizer)


def _own_step_counts(optimizer: torch.optim.Optimizer) -> None:
    """One shared ``step`` tensor would be advanced once per group at each step (wrong bias
    corrections): each group gets its own."""
    seen: set[int] = set()
    for state in optimizer.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(step))


ALL = (NO_NORM_CHECKS, FOUND_INF_HAND_OFF, SAFE_CHECKPOINT_FILES, WEIGHTS_ONLY_UNIVERSAL, UNIVERSAL_GROUPS)
