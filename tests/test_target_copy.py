"""speed.bf16_target_copy: the bf16 copy of the target encoder's matmul weights is autocast's cast of the
fp32 EMA weights bit for bit (after every EMA update, and through a skipped step), the target forward
that reads it computes what autocast computes, and checkpoints hold only the fp32 weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ijepa_fast.config import Config, ModelConfig
from ijepa_fast.engines.plain import PlainEngine
from ijepa_fast.masks.sampler import MultiBlockMaskSampler
from ijepa_fast.models.ijepa import build_models
from ijepa_fast.models.target_copy import Bf16TargetCopy, autocast_cast_params
from ijepa_fast.train.build import build_engine, models_for_run, target_copy_for, train_step_for
from ijepa_fast.train.step import StepOptions, TrainStep, ema_update

TINY = ModelConfig(name="vit_tiny", depth=2, patch_size=7, pred_depth=1, pred_emb_dim=48)
IMG = 35  # a 5 x 5 grid: odd token counts
BF16 = torch.bfloat16


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


def _copy_is_cast(copy: Bf16TargetCopy, target: torch.nn.Module) -> bool:
    params = list(target.parameters())
    return all(o is None or _bits_equal(o, p.detach().to(BF16)) for p, o in zip(params, copy.outputs_for(params)))


def _models(seed: int = 0):
    torch.manual_seed(seed)
    return build_models(TINY, IMG)


def _drift(target: torch.nn.Module, seed: int) -> None:
    """Weights away from their initial values (zero biases, unit norms), as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_the_copy_covers_exactly_the_weights_autocast_casts():
    _, target = _models()
    names = {n for n, _ in autocast_cast_params(target)}
    kinds = {"patch_embed.proj", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    want = {n for n, _ in target.named_parameters() if any(k in n for k in kinds)}
    assert names == want and len(names) == 2 + 2 * 4 * TINY.depth  # patch conv + 4 linears per block
    assert not any("norm" in n or "pos_embed" in n for n in names)  # autocast keeps those fp32


@pytest.mark.parametrize("bf16_residual", [False, True])
def test_target_forward_reading_the_copy_equals_autocasts_bit_for_bit(bf16_residual):
    _, target = _models()
    _drift(target, 1)
    target.set_bf16_residual(bf16_residual)
    copy = Bf16TargetCopy(target)
    images = torch.randn(3, 3, IMG, IMG)
    with torch.autocast("cpu", BF16), torch.no_grad():
        want, got = target(images), copy(images)
    assert _bits_equal(got.view(-1).to(BF16), want.view(-1).to(BF16)) and torch.equal(got, want)
    assert all(p.dtype == torch.float32 for p in target.parameters())  # the module itself is untouched


@pytest.mark.parametrize("fused_ema", [True, False])
def test_ema_keeps_the_copy_the_cast_and_a_skipped_step_keeps_every_bit(fused_ema):
    student, target = _models()
    _drift(student.encoder, 2)
    copy = Bf16TargetCopy(target)
    targets, sources = list(target.parameters()), list(student.encoder.parameters())
    for m in (0.9, 0.996):
        ema_update(targets, sources, m, fused=fused_ema, bf16_out=copy.outputs_for(targets))
        assert _copy_is_cast(copy, target)
    before = [t.clone() for t in copy.tensors.values()]
    ema_update(targets, sources, 0.5, fused=fused_ema, apply=torch.tensor(False), bf16_out=copy.outputs_for(targets))
    assert all(_bits_equal(a, b) for a, b in zip(copy.tensors.values(), before))
    assert _copy_is_cast(copy, target)


def _plain_step(target_copy: bool, options: StepOptions | None = None) -> TrainStep:
    from ijepa_fast.config import OptimConfig
    from ijepa_fast.train.optim import build_optimizer
    from ijepa_fast.train.schedules import Schedules

    student, target = _models()
    optim_cfg = OptimConfig(epochs=1, warmup_epochs=0, start_lr=1e-3, lr=1e-3, final_lr=1e-3, ema=(0.9, 0.9))
    engine = PlainEngine(student, target, build_optimizer(student, optim_cfg, torch.device("cpu")), torch.device("cpu"))
    copy = Bf16TargetCopy(target) if target_copy else None
    return TrainStep(engine, Schedules.from_config(optim_cfg, 10), BF16, options, target_copy=copy)


def test_training_with_the_copy_is_training_without_it_bit_for_bit_and_a_nan_step_changes_nothing():
    """Two bf16 steps with and without the copy: the same losses and weights, bit for bit (the copy
    is exact); then a step on NaN images is skipped and leaves the copy's and the target's bits."""
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 3, IMG, IMG, generator=g) for _ in range(2)]
    masks = MultiBlockMaskSampler(5, min_keep=2, seed=0)(4, step=0)
    runs = {}
    for on in (False, True):
        step = _plain_step(on)
        runs[on] = (torch.stack([step(x, masks, i)["loss"] for i, x in enumerate(batches)]), step)
    assert torch.equal(runs[True][0], runs[False][0])
    with_copy, without = runs[True][1], runs[False][1]
    for a, b in zip(with_copy.target_encoder.parameters(), without.target_encoder.parameters()):
        assert torch.equal(a, b)
    assert _copy_is_cast(with_copy.target_copy, with_copy.target_encoder)
    copy_bits = [t.clone() for t in with_copy.target_copy.tensors.values()]
    target_bits = [p.clone() for p in with_copy.target_encoder.parameters()]
    out = with_copy(torch.full_like(batches[0], float("nan")), masks, 2)
    assert not bool(out["step_finite"])
    assert all(_bits_equal(a, b) for a, b in zip(with_copy.target_copy.tensors.values(), copy_bits))
    assert all(torch.equal(a, b) for a, b in zip(with_copy.target_encoder.parameters(), target_bits))


def _config(tmp_path, **speed) -> Config:
    cfg = Config()
    cfg.model = TINY
    cfg.data.crop_size, cfg.data.batch_size = IMG, 4
    cfg.mask.min_keep = 2
    cfg.optim.epochs, cfg.optim.warmup_epochs = 1, 0
    cfg.run.device, cfg.run.dtype, cfg.run.out_dir = "cpu", "bf16", str(tmp_path)
    for k, v in speed.items():
        setattr(cfg.speed, k, v)
    return cfg.validate()


def test_a_checkpoint_holds_the_fp32_weights_only_and_a_restore_rebuilds_the_copy(tmp_path):
    cfg = _config(tmp_path)
    cpu = torch.device("cpu")
    engine = build_engine(cfg, *models_for_run(cfg, cpu), cpu)
    step = train_step_for(cfg, engine, 10)
    assert step.target_copy is not None
    images = torch.randn(4, 3, IMG, IMG)
    masks = MultiBlockMaskSampler(5, min_keep=2, seed=0)(4, step=0)
    for i in range(2):
        step(images, masks, i)
    engine.save(tmp_path, 2, {"meta": 1}, keep=1)
    saved = torch.load(next((tmp_path / "checkpoints").glob("ckpt-*.pt")), weights_only=False)
    assert set(saved["target_encoder"]) == set(engine.target_encoder.state_dict())
    assert all(v.dtype == torch.float32 for v in saved["target_encoder"].values())

    torch.manual_seed(123)  # another initialisation, which the restore must replace
    fresh = build_engine(cfg, *models_for_run(cfg, cpu), cpu)
    fresh.load(tmp_path)
    resumed = train_step_for(cfg, fresh, 10)
    for (name, p), q in zip(fresh.target_encoder.named_parameters(), engine.target_encoder.parameters()):
        assert torch.equal(p, q), name
    assert _copy_is_cast(resumed.target_copy, fresh.target_encoder)
    copies = zip(resumed.target_copy.tensors.values(), step.target_copy.tensors.values())
    assert all(_bits_equal(a, b) for a, b in copies)


def test_the_copy_is_built_only_where_it_acts(tmp_path):
    cpu = torch.device("cpu")
    cases = (({}, "bf16", True), ({"bf16_target_copy": False}, "bf16", False), ({}, "fp32", False))
    for speed, dtype, built in cases:
        cfg = _config(tmp_path, **speed)
        cfg.run.dtype = dtype
        assert (train_step_for(cfg, build_engine(cfg, *_models(), cpu), 10).target_copy is not None) == built


def test_an_engine_that_partitions_the_target_gets_no_copy(tmp_path):
    """The switch is on by default, so ZeRO-3 and FSDP2 (each rank holds a shard of the target encoder)
    run without the copy instead of refusing the config."""
    cfg = _config(tmp_path)
    cfg.run.zero_stage, cfg.run.engine = 3, "deepspeed"
    cfg.validate()
    from ijepa_fast.engines.fsdp2.engine import FSDP2Engine
    from ijepa_fast.engines.plain import PlainEngine

    assert FSDP2Engine.shards_target and not PlainEngine.shards_target
    for name in ("deepspeed", "fsdp2"):
        assert target_copy_for(cfg, SimpleNamespace(shards_target=True, name=name), torch.bfloat16) is None
    whole = SimpleNamespace(shards_target=False, name="deepspeed", target_encoder=_models()[1])
    assert target_copy_for(cfg, whole, torch.bfloat16)
