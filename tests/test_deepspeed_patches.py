"""The patches of DeepSpeed internals (``ijepa_fast.engines.deepspeed.patches``) against the installed
DeepSpeed: every function, method or class a patch relies on still has the source the patch was
written against, the pinned release is the one the lock file and setup.py install, another release
refuses or warns per patch, and each patch does what it claims, in isolation (through real
DeepSpeed engines: ``test_deepspeed.py``)."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ijepa_fast.engines.deepspeed import patches
from ijepa_fast.runtime.optional import available

pytestmark = pytest.mark.skipif(
    not available("deepspeed"), reason="deepspeed is not installed (pip install 'deepspeed==0.19.8')"
)

REPO = Path(__file__).resolve().parents[1]
OTHER_RELEASE = "0.20.0"

# sha256 of inspect.getsource(...) of each name a patch relies on, in deepspeed 0.19.8.
WRITTEN_AGAINST = (
    (
        "deepspeed.runtime.utils.is_invalid_grad_norm",
        "6afd483e2c88e25ed478b5c81f9ac18963f728ee195f1b427c3bdaf52a66cfb0",
    ),
    (
        "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer.step",
        "9520884fd916d178728985781674b3c26241dde23e71043dc0beabe507b63b5c",
    ),
    (
        "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer.unscale_and_clip_grads",
        "6bf2ce6f97eafcc24c08a0355e7c180992c8e86da5b7f02026eef6fbd68efa74",
    ),
    (
        "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3.step",
        "89aab0f80f1a80b328a6b87b3cec95352b8973c4a69e3c805ac162950ff9f7fc",
    ),
    (
        "deepspeed.runtime.engine.DeepSpeedEngine.get_optimizer_configuration",
        "ed96609a3a6500ff5db95ce0e0d7690c1bf5d17d90eac2337e0da18bf12e963d",
    ),
    (
        "deepspeed.runtime.engine.DeepSpeedEngine._take_model_step",
        "c4c6e01aa1fc4e7d83fd1076b4105ff104161d5c7d359bcfa2d1ecebdc34b1b8",
    ),
    (
        "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer._optimizer_step",
        "d7e21affbbf9b696584576042b21bc6147bc15e7ff0baa35b78140da4a484347",
    ),
    (
        "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3._optimizer_step",
        "35f8511bba5ff760b250d0b0a7d062d28dda6adb699913a298de4b44dba17951",
    ),
    (
        "deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine.TorchCheckpointEngine.load",
        "634b7e06db58550c2088a2aed8f176a66e92e929f0f8ba3266006858fcb87ef7",
    ),
    (
        "deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine.TorchCheckpointEngine.save",
        "85c17d05c806c95d9efcd176c8a17a9ea22740fbdc71d51721f47f0652070466",
    ),
    (
        "deepspeed.runtime.engine.DeepSpeedEngine._configure_checkpointing",
        "98e9abf5e50b1dce91da2d57ef03641b2672cf71ea48afd93190944e6e522279",
    ),
    (
        "deepspeed.runtime.engine.DeepSpeedEngine._load_checkpoint",
        "45c1953baa73cd3dd02ca7d6120a220d0b2a6dc6eafec72bace05e5714e2c73c",
    ),
    (
        "deepspeed.runtime.engine.DeepSpeedEngine._get_all_zero_checkpoint_state_dicts",
        "6eae1e15f058a37eadd9b16ad70772d04f61c4e9b8ca5473dd156f00b9f3cb8e",
    ),
    (
        "deepspeed.runtime.engine.DeepSpeedEngine._save_checkpoint",
        "7cec5b09ea912dd591d8c21fb9706b9a1db0b365ccd9ea2ed19bb36cbe16a0a1",
    ),
    (
        "deepspeed.runtime.engine.DeepSpeedEngine._save_zero_checkpoint",
        "9053a2fbcfbc2a8721b3ba3f480c2ffdbec451497c6d2d12fde07e7d084fd386",
    ),
    (
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "8ac1caa0395fda3997bc7eee565fc59a2c232a803624f20c59f655a82e55cb8d",
    ),
    ("deepspeed.runtime.zero.config.ZeroStageEnum", "6d2ffddc406ecd5ff9cdc208e1e311ba103923871bc6f5589dc5cb5065ac0387"),
    (
        "deepspeed.utils.tensor_fragment.fragment_address",
        "8dad3663b24177483efa68eda097f47194c5d5f2aae712880da450b7ff357c7b",
    ),
    ("deepspeed.checkpoint.ds_to_universal.main", "24d330b69ba1d5106a608919d7ac0f196351cde98a1e51661860c92edc23dde1"),
    (
        "deepspeed.checkpoint.universal_checkpoint.load_hp_checkpoint_state",
        "981405e95ffd4c73ff05477364d755048a98743088f8257578c0a0d0acd419b5",
    ),
    (
        "deepspeed.runtime.base_optimizer.ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir",
        "7532435ffb5b067a9b26c7f64909205b891651e5abacf37338fb14941dde55d1",
    ),
    (
        "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3",
        "9e3e3f5f452603d40426bffa892f97945b9e4b5fb59eefc6a2f696ea7dce843c",
    ),
    (
        "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state",
        "37391962878d2b796277b7a248a7ccc1588a1a379438f8b29a374fe4f29d9f5e",
    ),
    (
        "deepspeed.runtime.engine.DeepSpeedEngine.load_universal_checkpoint",
        "640c6085a8312cb2cebaa990454a9591dd038b719e5d3d950e597530f7279fa9",
    ),
)


def resolve(qualified: str):
    """The object a qualified name names: its longest importable module, then attributes."""
    parts = qualified.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute)
        return found
    raise ImportError(qualified)


def source_sha256(qualified: str) -> str:
    try:
        return hashlib.sha256(inspect.getsource(resolve(qualified)).encode()).hexdigest()
    except (ImportError, AttributeError):
        return "gone"


def test_the_pinned_release_is_the_one_installed_locked_and_required():
    import deepspeed

    lock = re.findall(r"^deepspeed==(\S+)$", (REPO / "requirements-lock.txt").read_text(), re.M)
    setup = re.findall(r"deepspeed==([\w.]+)", (REPO / "setup.py").read_text())
    assert lock == [patches.DEEPSPEED_VERSION]
    assert setup and set(setup) == {patches.DEEPSPEED_VERSION}
    assert deepspeed.__version__.split("+")[0] == patches.DEEPSPEED_VERSION


def test_every_name_a_patch_relies_on_has_its_source_recorded():
    relied_on = {name for patch in patches.ALL for name in patch.relies_on}
    assert relied_on == {name for name, _ in WRITTEN_AGAINST}


@pytest.mark.parametrize("patch", patches.ALL, ids=lambda p: p.name)
def test_deepspeed_still_has_the_source_each_patch_was_written_against(patch):
    recorded = dict(WRITTEN_AGAINST)
    changed = [name for name in patch.relies_on if source_sha256(name) != recorded[name]]
    assert not changed, (
        f"the installed deepspeed changed {', '.join(changed)} since {patches.DEEPSPEED_VERSION}: "
        f"re-check the patch {patch.name} in ijepa_fast/engines/deepspeed/patches.py against the new "
        f"source, then record its sha256 in WRITTEN_AGAINST"
    )


# ----------------------------------------------------------------------------- another release


@pytest.fixture
def other_release(monkeypatch):
    import deepspeed

    monkeypatch.setattr(deepspeed, "__version__", OTHER_RELEASE + "+local")


def _refusal(patch) -> str:
    return (
        f"^DeepSpeed patch {patch.name} was written against deepspeed {re.escape(patches.DEEPSPEED_VERSION)}, "
        f"this is deepspeed {re.escape(OTHER_RELEASE)}: install"
    )


def test_a_local_build_of_the_pinned_release_counts_as_that_release(monkeypatch):
    import deepspeed

    monkeypatch.setattr(deepspeed, "__version__", patches.DEEPSPEED_VERSION + "+abc123")
    assert all(p.written_for_installed() for p in patches.ALL)


def test_no_norm_checks_refuses_another_release_and_changes_nothing(other_release):
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    before = (stage_1_and_2.is_invalid_grad_norm, stage3.is_invalid_grad_norm)
    with pytest.raises(patches.DeepSpeedVersionError, match=_refusal(patches.NO_NORM_CHECKS)), patches.no_norm_checks():
        pass
    assert (stage_1_and_2.is_invalid_grad_norm, stage3.is_invalid_grad_norm) == before


def test_safe_checkpoint_files_refuses_another_release_and_changes_nothing(other_release):
    inner = object()
    engine = SimpleNamespace(checkpoint_engine=inner)
    with pytest.raises(patches.DeepSpeedVersionError, match=_refusal(patches.SAFE_CHECKPOINT_FILES)):
        patches.safe_checkpoint_files(engine)
    assert engine.checkpoint_engine is inner


def test_the_universal_conversion_and_load_refuse_another_release_and_change_nothing(other_release, tmp_path):
    engine = SimpleNamespace(_config=SimpleNamespace(load_universal_checkpoint=False))
    real = torch.load
    refusal = _refusal(patches.WEIGHTS_ONLY_UNIVERSAL)
    with pytest.raises(patches.DeepSpeedVersionError, match=refusal), patches.universal_checkpoint_load(engine, []):
        pass
    assert engine._config.load_universal_checkpoint is False and torch.load is real
    with pytest.raises(patches.DeepSpeedVersionError, match=refusal):
        patches.run_ds_to_universal(tmp_path, tmp_path / "universal", [])
    assert list(tmp_path.iterdir()) == []


def _fused_adamw() -> torch.optim.AdamW:
    return torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1, fused=True)


def test_the_found_inf_hand_off_on_another_release_warns_and_steps_as_a_non_fused_optimizer(other_release):
    optimizer = _fused_adamw()
    with pytest.warns(patches.DeepSpeedVersionWarning, match=_refusal(patches.FOUND_INF_HAND_OFF)):
        step = patches.FiniteStep(optimizer, zero_stage=0)
    assert not step.skips_non_finite and not optimizer._optimizer_step_pre_hooks


# ----------------------------------------------------------------------------- what each patch does


def test_no_norm_checks_passes_device_norms_to_the_step_and_still_checks_numbers():
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    before = (stage_1_and_2.is_invalid_grad_norm, stage3.is_invalid_grad_norm)
    seen = []
    with patches.no_norm_checks(seen.append):
        inf = torch.tensor(float("inf"))
        assert stage3.is_invalid_grad_norm(inf) is False and stage_1_and_2.is_invalid_grad_norm(inf) is False
        assert stage_1_and_2.is_invalid_grad_norm(float("inf")) is True
    assert seen == [inf, inf]
    assert (stage_1_and_2.is_invalid_grad_norm, stage3.is_invalid_grad_norm) == before
    assert stage3.is_invalid_grad_norm(inf) is True


class _StepsItsOptimizer:
    """DeepSpeed's engine at stage 0 as far as ``FiniteStep`` reaches it: ``step`` steps the optimizer."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        self.optimizer.step()


def test_the_found_inf_hand_off_skips_a_non_finite_step_on_the_device_and_applies_a_finite_one():
    optimizer = _fused_adamw()
    param = optimizer.param_groups[0]["params"][0]
    step = patches.FiniteStep(optimizer, zero_stage=0)
    engine = _StepsItsOptimizer(optimizer)
    assert step.skips_non_finite
    param.grad = torch.tensor([1.0, float("nan"), 1.0])
    assert not bool(step.step(engine, torch.tensor(True)))  # stage 0: the gradients themselves
    param.grad = torch.ones(3)
    assert not bool(step.step(engine, torch.tensor(False)))  # the step's own flag (a non-finite loss)
    assert torch.equal(param, torch.ones(3)) and "found_inf" not in optimizer.__dict__
    assert bool(step.step(engine, torch.tensor(True)))
    assert (param < 1).all()


def test_a_universal_load_leaves_each_group_its_own_settings_and_step_count():
    inner = torch.optim.AdamW(
        [
            {"params": [torch.nn.Parameter(torch.ones(2))], "weight_decay": 0.05},
            {"params": [torch.nn.Parameter(torch.ones(2))], "weight_decay": 0.0},
        ]
    )
    for group in inner.param_groups:
        group["params"][0].grad = torch.ones(2)
    inner.step()  # every parameter has its state, with a step tensor
    zero_optimizer = SimpleNamespace(optimizer=inner, param_groups=inner.param_groups)
    with patches.groups_kept_through_universal_load(zero_optimizer):
        shared = torch.tensor(7.0)  # what ZeRO-3's universal load does
        for group in inner.param_groups:
            group["weight_decay"] = 0.05
        for state in inner.state.values():
            state["step"] = shared
    assert [g["weight_decay"] for g in inner.param_groups] == [0.05, 0.0]
    steps = [state["step"] for state in inner.state.values()]
    assert len({id(s) for s in steps}) == 2 and all(float(s) == 7.0 for s in steps)


def test_the_universal_group_fix_up_on_another_release_warns_and_still_applies(other_release):
    inner = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.ones(2))], "weight_decay": 0.05}])
    zero_optimizer = SimpleNamespace(optimizer=inner, param_groups=inner.param_groups)
    with (
        pytest.warns(patches.DeepSpeedVersionWarning, match=_refusal(patches.UNIVERSAL_GROUPS)),
        patches.groups_kept_through_universal_load(zero_optimizer),
    ):
        inner.param_groups[0]["weight_decay"] = 0.0
    assert inner.param_groups[0]["weight_decay"] == 0.05
