"""One training step: the loss falls, EMA follows its formula, runs are reproducible, no host syncs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ijepa_fast.config import ModelConfig, OptimConfig
from ijepa_fast.engines.plain import PlainEngine
from ijepa_fast.masks.sampler import MultiBlockMaskSampler
from ijepa_fast.models.ijepa import build_models, compute_targets
from ijepa_fast.train.loss import jepa_loss
from ijepa_fast.train.optim import build_optimizer, param_groups
from ijepa_fast.train.schedules import Schedules
from ijepa_fast.train.step import StepOptions, TrainStep, all_finite, ema_update

TINY = ModelConfig(name="vit_tiny", patch_size=8, pred_depth=2, pred_emb_dim=96)
IMG = 32  # 4 x 4 grid


def make_step(
    seed=0,
    options=None,
    lr=1e-3,
    epochs=1,
    steps_per_epoch=50,
    grad_accum=1,
    sgd=False,
    loss="smooth_l1",
    grad_clip=0.0,
    grad_scaler=False,
):
    torch.manual_seed(seed)
    opts = options or StepOptions()
    student, target = build_models(TINY, IMG, fused_gather=opts.fused_gather, loss=loss)
    optim_cfg = OptimConfig(epochs=epochs, warmup_epochs=0, start_lr=lr, lr=lr, final_lr=lr)
    if sgd:
        opt = torch.optim.SGD(param_groups(student), lr=lr)
    else:
        opt = build_optimizer(student, optim_cfg, torch.device("cpu"))
    sched = Schedules.from_config(optim_cfg, steps_per_epoch)
    engine = PlainEngine(student, target, opt, torch.device("cpu"), grad_clip=grad_clip, grad_scaler=grad_scaler)
    return TrainStep(engine, sched, None, opts, grad_accum=grad_accum)


def fixed_batch(B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, IMG, IMG, generator=g)
    masks = MultiBlockMaskSampler(4, min_keep=2, seed=seed)(B, step=0)
    return images, masks


def test_loss_falls_on_a_fixed_batch():
    step = make_step()
    images, masks = fixed_batch()
    losses = [step(images, masks, i)["loss"] for i in range(50)]
    first, last = losses[0].item(), torch.stack(losses[-5:]).mean().item()
    assert last < 0.5 * first, (first, last)


def test_same_seed_same_losses_and_different_seed_differs():
    images, masks = fixed_batch()
    runs = []
    for seed in (0, 0, 1):
        step = make_step(seed)
        runs.append(torch.stack([step(images, masks, i)["loss"] for i in range(5)]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_step_returns_device_tensors_and_leaves_targets_without_grad():
    step = make_step()
    images, masks = fixed_batch()
    out = step(images, masks, 0)
    assert isinstance(out["loss"], torch.Tensor) and out["loss"].dim() == 0 and not out["loss"].requires_grad
    assert all(p.grad is None for p in step.target_encoder.parameters())
    assert all(not p.requires_grad for p in step.target_encoder.parameters())


def test_one_step_equals_a_plain_restatement():
    """Loss, AdamW update and EMA of one step against a hand-written version of the authors' step."""
    step = make_step()
    ref_student, ref_target = copy.deepcopy(step.student), copy.deepcopy(step.target_encoder)
    images, masks = fixed_batch()
    out = step(images, masks, 0)

    with torch.no_grad():
        h = F.layer_norm(ref_target(images), (192,))
        h = torch.cat(
            [torch.stack([h[b, masks.targets[m, b]] for b in range(h.shape[0])]) for m in range(masks.targets.shape[0])]
        )
    z = ref_student.predictor(ref_student.encoder(images, masks.context), masks.context, masks.targets)
    loss = F.smooth_l1_loss(z, h)
    torch.testing.assert_close(out["loss"], loss.detach(), rtol=1e-6, atol=1e-7)
    opt = torch.optim.AdamW(param_groups(ref_student), lr=1e-3, weight_decay=step.schedules.wd_at(0))
    opt.param_groups[1]["weight_decay"] = 0.0
    loss.backward()
    opt.step()
    m = step.schedules.momentum_at(0)
    with torch.no_grad():
        for t, s in zip(ref_target.parameters(), ref_student.encoder.parameters()):
            t.mul_(m).add_((1 - m) * s)
    for a, b in zip(step.student.parameters(), ref_student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(step.target_encoder.parameters(), ref_target.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_ema_matches_the_formula_exactly(fused):
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5))
    tgt = copy.deepcopy(src)
    for p in tgt.parameters():
        p.data.normal_()
    expected = [(0.9961 * t.double() + (1 - 0.9961) * s.double()) for t, s in zip(tgt.parameters(), src.parameters())]
    ema_update(list(tgt.parameters()), list(src.parameters()), 0.9961, fused=fused)
    for t, e in zip(tgt.parameters(), expected):
        # the float64 formula, up to the fp32 rounding of two operations (2 ulp)
        torch.testing.assert_close(t.double(), e, rtol=2 * 2.0**-23, atol=1e-30)


def test_param_groups_exclude_biases_and_1d_from_weight_decay():
    student, _ = build_models(TINY, IMG)
    decay, no_decay = param_groups(student)
    assert all(p.ndim > 1 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in student.parameters() if p.requires_grad)


def test_the_authors_adamw_leaves_the_implementation_to_torch():
    """fused=False is the authors' torch.optim.AdamW(param_groups): neither foreach nor fused is
    forced, so torch picks its default (foreach for CUDA tensors)."""
    student, _ = build_models(TINY, IMG)
    opt = build_optimizer(student, OptimConfig(), torch.device("cuda"), fused=False)
    assert opt.defaults["foreach"] is None and opt.defaults["fused"] is None
    fast = build_optimizer(student, OptimConfig(), torch.device("cpu"))
    assert fast.defaults["foreach"] is True


@pytest.mark.parametrize("kind", ["smooth_l1", "l2"])
def test_loss_kinds(kind):
    a, b = torch.randn(6, 3, 4), torch.randn(6, 3, 4)
    ref = F.smooth_l1_loss(a, b, beta=1.0) if kind == "smooth_l1" else ((a - b) ** 2).mean()
    torch.testing.assert_close(jepa_loss(a, b, kind), ref)
    with pytest.raises(ValueError, match="differ in shape"):
        jepa_loss(a, b[:, :2], kind)


@pytest.mark.parametrize(
    "opts, kw",
    [
        (StepOptions(fused_ema=False, fused_gather=False, sync_every_step=True), {"grad_scaler": True}),  # authors
        (StepOptions(), {"loss": "l2", "grad_clip": 1.0}),
    ],
)
def test_switch_combinations_run_and_match(opts, kw):
    images, masks = fixed_batch()
    fast = make_step(options=StepOptions())
    other = make_step(options=opts, **kw)
    a = torch.stack([fast(images, masks, i)["loss"] for i in range(3)])
    b = torch.stack([other(images, masks, i)["loss"] for i in range(3)])
    if kw.get("loss", "smooth_l1") == "smooth_l1":  # the authors' preset computes the same thing
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(b).all()


def test_targets_are_normalised_per_token():
    step = make_step()
    images, masks = fixed_batch()
    t = compute_targets(step.target_encoder, images, masks)
    assert t.shape == (masks.targets.shape[0] * 8, masks.targets.shape[2], 192)
    torch.testing.assert_close(t.mean(-1), torch.zeros(t.shape[:2]), atol=1e-5, rtol=0)


def _weights(step: TrainStep) -> dict[str, torch.Tensor]:
    return {
        f"{k}.{n}": v.detach().clone()
        for k, m in (("student", step.student), ("target", step.target_encoder))
        for n, v in m.state_dict().items()
    }


@pytest.mark.parametrize(
    "sgd,engine_kw",
    [
        (True, {}),
        (True, {"grad_clip": 0.05}),
        (False, {"grad_clip": 0.05}),
        (False, {"grad_clip": 0.05, "grad_scaler": True}),
    ],
    ids=["sgd", "sgd+clip", "adamw+clip", "adamw+clip+scaler"],
)
def test_two_accumulated_halves_equal_one_step_on_the_whole_batch(sgd, engine_kw):
    """The loss is a mean over equally sized halves, so (grad half 1 + grad half 2) / 2 is the whole
    batch's gradient; clipping (0.05, below the norm) must act on the sum, once, as must the optimizer
    and the EMA. SGD (lr 0.5) is there because AdamW barely sees a gradient's scale: it catches a
    missing 1/k."""
    images, masks = fixed_batch(B=8)
    halves = [
        (images[rows], type(masks)(masks.context[rows], masks.targets[:, rows])) for rows in (slice(0, 4), slice(4, 8))
    ]
    lr = 0.5 if sgd else 1e-3
    whole, accum = make_step(sgd=sgd, lr=lr, **engine_kw), make_step(grad_accum=2, sgd=sgd, lr=lr, **engine_kw)
    for i in range(2):
        whole(images, masks, i)
        before = _weights(accum)
        accum(*halves[0], i)
        after = _weights(accum)
        assert not accum.stepped and all(torch.equal(v, after[k]) for k, v in before.items())
        accum(*halves[1], i)
        assert accum.stepped
        got, want = _weights(accum), _weights(whole)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_grad_accum_must_be_positive():
    with pytest.raises(ValueError, match="grad_accum=0"):
        make_step(grad_accum=0)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_all_finite_finds_one_bad_element_anywhere_and_accepts_huge_finite_ones(device):
    """Against torch.isfinite element by element: shapes that split unevenly, mixed dtypes, an empty
    tensor, one inf or nan at any position; 1e30 (whose square overflows float32) is finite."""
    shapes, dtypes = [(6, 42), (123,), (0,), (3, 5, 7)], [torch.float32, torch.bfloat16, torch.float32, torch.float32]
    g = torch.Generator().manual_seed(0)
    clean = [torch.randn(s, generator=g).to(device, d) * 1e30 for s, d in zip(shapes, dtypes)]
    assert bool(all_finite(clean))
    assert all_finite(clean).device.type == device
    for which in (0, 1, 3):
        for position in (0, clean[which].numel() // 2, clean[which].numel() - 1):
            for bad in (float("nan"), float("inf"), -float("inf")):
                tensors = [t.clone() for t in clean]
                tensors[which].view(-1)[position] = bad
                assert not all(bool(torch.isfinite(t).all()) for t in tensors)  # the reference sees it
                assert not bool(all_finite(tensors)), (which, position, bad)


def test_weights_finite_sees_the_student_and_the_target():
    step = make_step()
    assert bool(step.engine.weights_finite())
    for module in (step.student.predictor, step.target_encoder):
        weight = next(module.parameters())
        with torch.no_grad():
            saved = weight.view(-1)[3].item()
            weight.view(-1)[3] = float("nan")
            assert not bool(step.engine.weights_finite())
            weight.view(-1)[3] = saved
    assert bool(step.engine.weights_finite())
