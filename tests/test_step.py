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
    amp_dtype=None,
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
    return TrainStep(engine, sched, amp_dtype, opts, grad_accum=grad_accum)


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
    forced, so torch picks its default (foreach for CUDA tensors). The default is fused, on a CPU
    too: only the fused kernels can skip a non-finite step on the device."""
    student, _ = build_models(TINY, IMG)
    opt = build_optimizer(student, OptimConfig(), torch.device("cuda"), fused=False)
    assert opt.defaults["foreach"] is None and opt.defaults["fused"] is None
    fast = build_optimizer(student, OptimConfig(), torch.device("cpu"))
    assert fast.defaults["fused"] is True


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


# ----------------------------------------------------------------------------- non-finite steps


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: equal bits, not equal values (a NaN equals itself, -0.0 differs from 0.0)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _state(step: TrainStep) -> dict[str, torch.Tensor]:
    """Every tensor a step may change: student and target weights, AdamW's moments and step counts."""
    state = _weights(step)
    for i, p in enumerate(step.engine._params):
        for k, v in step.optimizer.state[p].items():
            state[f"opt.{i}.{k}"] = v.detach().clone()
    return state


def _assert_same_bits(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    changed = [k for k in want if not torch.equal(_bits(got[k]), _bits(want[k]))]
    assert not changed, f"changed by a skipped step: {changed[:5]}"


def _poison(step: TrainStep, what: str, when: set[int]) -> None:
    """From now on, calls (0-based, counted over micro-batches) in ``when`` get a non-finite loss with
    finite gradients ("loss": a NaN constant added), or a finite loss with one non-finite gradient
    ("grad": the first trained encoder weight's gradient made inf by a hook)."""
    calls = {"n": 0, "bad": False}
    forward = step.student.forward

    def poisoned(*args, **kwargs):
        loss = forward(*args, **kwargs)
        calls["bad"] = calls["n"] in when
        calls["n"] += 1
        if calls["bad"] and what == "loss":
            return loss + torch.tensor(float("nan"))  # no effect on any gradient
        return loss

    def inf_gradient(grad):
        return torch.full_like(grad, float("inf")) if calls["bad"] and what == "grad" else grad

    step.student.forward = poisoned
    next(p for p in step.student.encoder.parameters() if p.requires_grad).register_hook(inf_gradient)


def _changed(after: dict, before: dict, prefix: str) -> bool:
    return any(not torch.equal(after[k], before[k]) for k in before if k.startswith(prefix))


@pytest.mark.parametrize(
    "what,kw,options",
    [
        ("loss", {}, StepOptions()),
        ("grad", {}, StepOptions()),
        ("grad", {"grad_clip": 1.0}, StepOptions()),  # the flag from the norm clipping computes
        ("loss", {"grad_clip": 1.0}, StepOptions(fused_ema=False)),  # the authors' EMA loop
        ("loss", {"grad_scaler": True}, StepOptions()),  # the skip joins a GradScaler's found_inf
    ],
    ids=["nan-loss", "inf-grad", "inf-grad+clip", "nan-loss+clip+authors-ema", "nan-loss+scaler"],
)
def test_a_non_finite_step_and_every_later_one_change_nothing(what, kw, options):
    """Two good steps, then a bad one: from it on, the weights, AdamW's moments and step counts and the
    target encoder keep their bits (fused AdamW takes the flag as found_inf; the EMA skips), and the
    output's step_finite is false, while the good steps did change them."""
    images, masks = fixed_batch()
    step = make_step(options=options, **kw)
    assert step.engine.skips_non_finite
    _poison(step, what, when={2})
    initial = _state(step)
    outs = [step(images, masks, i) for i in range(2)]
    before = _state(step)
    assert all(bool(o["step_finite"]) for o in outs)
    assert _changed(before, initial, "student.") and _changed(before, initial, "target.")
    outs = [step(images, masks, i) for i in range(2, 5)]  # the bad step, then good ones: skipped too
    _assert_same_bits(_state(step), before)
    assert [bool(o["step_finite"]) for o in outs] == [False] * 3
    assert bool(torch.isfinite(outs[1]["loss"]))  # the later losses themselves are finite


def test_a_non_finite_micro_batch_skips_its_whole_accumulated_step():
    images, masks = fixed_batch()
    step = make_step(grad_accum=2)
    _poison(step, "loss", when={2})  # step 1's first micro-batch
    step(images, masks, 0)
    step(images, masks, 0)
    before = _state(step)
    step(images, masks, 1)
    out = step(images, masks, 1)
    assert step.stepped and not bool(out["step_finite"])
    _assert_same_bits(_state(step), before)


def test_under_a_grad_scaler_a_non_finite_gradient_is_the_scalers_to_skip():
    """With a GradScaler, an inf gradient is an overflow: the scaler skips the optimizer step and
    halves its scale, as in the authors' loop; the step stays finite (the run goes on) and the EMA
    runs, as the authors' does."""
    images, masks = fixed_batch()
    step = make_step(grad_scaler=True)
    _poison(step, "grad", when={1})
    step(images, masks, 0)
    before, scale = _state(step), step.engine.scaler.get_scale()
    out = step(images, masks, 1)
    after = _state(step)
    assert bool(out["step_finite"]) and step.engine.scaler.get_scale() == scale / 2
    assert not _changed(after, before, "student.") and not _changed(after, before, "opt.")
    assert _changed(after, before, "target.")


def test_fp16_trains_with_an_fp32_loss_fp32_weights_and_a_loss_scale():
    """run.dtype=fp16 on the CPU: fp16 autocast, the loss computed in fp32, every weight, moment and the
    EMA's target kept in fp32; the loss falls and the scaler's scale stays at its start (no overflow)."""
    images, masks = fixed_batch()
    step = make_step(grad_scaler=True, amp_dtype=torch.float16)
    scale = step.engine.scaler.get_scale()
    seen = []
    step.student.predictor.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    outs = [step(images, masks, i) for i in range(30)]
    assert seen[0] == torch.float16  # the autocast ran in fp16
    assert all(o["loss"].dtype == torch.float32 and bool(o["step_finite"]) for o in outs)
    first, last = outs[0]["loss"].item(), torch.stack([o["loss"] for o in outs[-5:]]).mean().item()
    assert last < 0.7 * first, (first, last)
    assert {t.dtype for t in _state(step).values() if t.is_floating_point()} == {torch.float32}
    assert step.engine.scaler.get_scale() == scale and not bool(step.engine.overflow)


def test_fp16_overflow_skips_the_step_and_the_ema_and_halves_the_scale():
    """A planted inf gradient under fp16: the scaler skips the optimizer step (weights, moments, step
    counts keep their bits) and halves its scale, the EMA leaves the target encoder as it was, and the
    run goes on (step_finite stays true); the next good step changes all of them again."""
    images, masks = fixed_batch()
    step = make_step(grad_scaler=True, amp_dtype=torch.float16)
    _poison(step, "grad", when={1})
    step(images, masks, 0)
    before, scale = _state(step), step.engine.scaler.get_scale()
    out = step(images, masks, 1)
    assert bool(out["step_finite"]) and bool(step.engine.overflow)
    assert step.engine.scaler.get_scale() == scale / 2
    _assert_same_bits(_state(step), before)
    out = step(images, masks, 2)
    after = _state(step)
    assert bool(out["step_finite"]) and not bool(step.engine.overflow)
    assert _changed(after, before, "student.") and _changed(after, before, "target.")


def test_a_non_fused_optimizer_cannot_skip_but_the_ema_does():
    """torch's foreach AdamW keeps its step counts on the host: its step is applied; the target
    encoder still keeps its bits."""
    images, masks = fixed_batch()
    step = make_step()
    optimizer = torch.optim.AdamW(param_groups(step.student), lr=1e-3, foreach=True)
    step.engine = PlainEngine(step.student, step.target_encoder, optimizer, torch.device("cpu"))
    assert not step.engine.skips_non_finite
    _poison(step, "loss", when={1})
    step(images, masks, 0)
    before = _state(step)
    out = step(images, masks, 1)
    after = _state(step)
    assert not bool(out["step_finite"])
    assert _changed(after, before, "student.")
    _assert_same_bits(*({k: v for k, v in state.items() if k.startswith("target.")} for state in (after, before)))


@pytest.mark.parametrize("fused", [True, False])
def test_ema_update_with_apply(fused):
    """apply=True: the same bits as without it; apply=False: the targets keep theirs."""
    torch.manual_seed(0)
    src, tgt = torch.nn.Linear(7, 5), torch.nn.Linear(7, 5)
    plain, gated = copy.deepcopy(tgt), copy.deepcopy(tgt)
    ema_update(list(plain.parameters()), list(src.parameters()), 0.9961, fused=fused)
    ema_update(list(gated.parameters()), list(src.parameters()), 0.9961, fused=fused, apply=torch.tensor(True))
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(plain.parameters(), gated.parameters()))
    before = [_bits(p).clone() for p in tgt.parameters()]
    with torch.no_grad():  # a skipped step's student may hold what the optimizer could not skip
        src.weight[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    ema_update(list(tgt.parameters()), list(src.parameters()), 0.9961, fused=fused, apply=torch.tensor(False))
    assert all(torch.equal(_bits(p), b) for p, b in zip(tgt.parameters(), before))
