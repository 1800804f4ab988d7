"""speed.fp8_target: the target encoder's block linears in float8 (torchao), emulated on the CPU.

References: a plain-PyTorch restatement of e4m3 rounding with per-row / per-tensor scales, and the
encoder in float64. Tolerances follow from the formats' unit roundoffs: e4m3 keeps 3 mantissa bits
(2^-4), bf16 7 (2^-8), so the float8 forward's error is at most 16 times the bf16 forward's (the same
operations, each operand rounded 16 times more coarsely) and, if the float8 path is really taken,
clearly above it."""

from __future__ import annotations

import copy

import pytest
import torch

from ijepa_fast import config as config_mod
from ijepa_fast.config import ConfigError
from ijepa_fast.models import fp8
from ijepa_fast.models.vit import build_encoder
from ijepa_fast.runtime import optional
from ijepa_fast.train.build import build_train_step
from tests.test_speed import TINY, batch, host_events, one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(not optional.available("torchao"), reason="needs torchao (the fp8 extra)")

E4M3_MAX = 448.0  # the largest finite e4m3fn value


def e4m3_reference(x: torch.Tensor, rowwise: bool) -> torch.Tensor:
    """``x`` rounded to e4m3 at the scale 448 / amax (per row, or over the tensor) and scaled back, in float64."""
    x = x.double()
    amax = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()
    scale = (E4M3_MAX / amax.clamp(min=1e-12)).float().double()  # torchao's scales are float32
    return (x * scale).clamp(-E4M3_MAX, E4M3_MAX).float().to(torch.float8_e4m3fn).double() / scale


def encoder(seed=0):
    torch.manual_seed(seed)
    return build_encoder("vit_tiny", img_size=32, patch_size=8, depth=2)


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_a_float8_linear_is_the_product_of_e4m3_rounded_operands(recipe):
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 24)
    x = torch.randn(3, 7, 40)
    rowwise = recipe == "rowwise"
    want = e4m3_reference(x, rowwise) @ e4m3_reference(linear.weight, rowwise).T + linear.bias.double()
    got = fp8.Float8ForwardLinear(linear, recipe, emulate=True)(x)
    assert got.shape == (3, 7, 24) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)  # fp32 accumulation of the same products


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_the_float8_target_forward_is_within_e4m3_rounding_of_the_bf16_one(recipe):
    enc, images = encoder(), torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = copy.deepcopy(enc).double()(images.double())
        float8 = copy.deepcopy(enc)
        fp8.quantize_target_linears(float8, recipe, emulate=True)
        with torch.autocast("cpu", torch.bfloat16):
            got8, got16 = float8(images), enc(images)
    err8 = ((got8.double() - exact).norm() / exact.norm()).item()
    err16 = ((got16.double() - exact).norm() / exact.norm()).item()
    assert 2 * err16 < err8 <= 16 * err16, (err8, err16)


def test_rowwise_scales_keep_an_outlier_token_from_flattening_the_others():
    """One token 10^5 times larger (past e4m3's normal range, 448 / 2^-6 = 2^15) sets a per-tensor
    scale that pushes the other tokens into e4m3's subnormals; per-row scales do not. (At 10^3 both
    recipes round the others alike: the range absorbs it.)"""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(16, 64)
    x[3] *= 1e5
    exact = x.double() @ linear.weight.double().T + linear.bias.double()
    others = [i for i in range(16) if i != 3]
    errors = {}
    for recipe in fp8.RECIPES:
        y = fp8.Float8ForwardLinear(linear, recipe, emulate=True)(x).double()
        errors[recipe] = ((y - exact)[others].norm() / exact[others].norm()).item()
    assert errors["rowwise"] < 0.05 < errors["tensorwise"], errors


def test_weights_are_quantised_when_asked_not_in_each_forward():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16)
    layer = fp8.Float8ForwardLinear(linear, "rowwise", emulate=True)
    x = torch.randn(5, 32)
    before = layer(x)
    with torch.no_grad():
        linear.weight.mul_(0.5)  # what an EMA update does to the fp32 weight
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)  # the float8 copy is not re-made per forward
    layer.requantize()
    fresh = fp8.Float8ForwardLinear(linear, "rowwise", emulate=True)
    torch.testing.assert_close(layer(x), fresh(x), rtol=0, atol=0)
    assert not torch.equal(layer(x), before)


def test_the_state_dict_keeps_the_encoders_names_and_only_the_fp32_weights():
    enc = encoder()
    names = {k: v.dtype for k, v in enc.state_dict().items()}
    params = [name for name, _ in enc.named_parameters()]  # the EMA pairs target and source tensors in this order
    linears = fp8.quantize_target_linears(enc, "rowwise", emulate=True)
    assert len(linears) == 4 * len(enc.blocks)
    assert {k: v.dtype for k, v in enc.state_dict().items()} == names
    assert [name for name, _ in enc.named_parameters()] == params
    enc.load_state_dict(encoder(seed=1).state_dict())  # a bf16 encoder's checkpoint loads as it is


def fp8_step(extra=()):
    torch.manual_seed(0)
    cfg = config_mod.load(None, [*TINY, "speed.fp8_target=rowwise", *extra])
    return build_train_step(cfg, torch.device("cpu"), steps_per_epoch=10)


@pytest.mark.usefixtures("one_thread")
def test_a_step_requantises_each_weight_once_after_the_ema(monkeypatch):
    step = fp8_step()
    linears = fp8.float8_linears(step.target_encoder)
    assert len(linears) == 4 * len(step.target_encoder.blocks) and not fp8.float8_linears(step.student)
    images, masks = batch()
    step(images, masks, 0)  # the first step also quantises before its target forward (weights may be loaded)
    calls = []
    original = fp8.Float8ForwardLinear.requantize
    monkeypatch.setattr(fp8.Float8ForwardLinear, "requantize", lambda self: (calls.append(self), original(self)))
    out = step(images, masks, 1)
    assert torch.isfinite(out["loss"]) and len(calls) == len(linears) and set(map(id, calls)) == set(map(id, linears))
    for layer in linears:  # after the step: the float8 copy of the EMA-updated weight
        want = e4m3_reference(layer.weight, rowwise=True)
        got = layer.weight_fp8.double() / layer.weight_scale.double()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.usefixtures("one_thread")
def test_the_float8_step_never_waits_for_the_device(monkeypatch):
    from ijepa_fast.kernels import _dispatch as dispatch

    monkeypatch.setattr(dispatch, "check_range", lambda *args, **kwargs: None)
    events, _ = host_events(["speed.fp8_target=tensorwise"], monkeypatch)
    assert events == ["optimizer step", "zero_grad"]


def test_a_bad_recipe_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="speed.fp8_target='fp4' is invalid: expected one of off, rowwise"):
        config_mod.load(None, ["speed.fp8_target=fp4"])


@pytest.mark.usefixtures("one_thread")
def test_zero3_with_a_float8_target_is_refused():
    cfg = config_mod.load(
        None,
        [*TINY, "speed.fp8_target=rowwise", "speed.bf16_target_copy=false", "run.engine=deepspeed", "run.zero_stage=3"],
    )
    with pytest.raises(ConfigError, match="ZeRO-3 partitions"):
        build_train_step(cfg, torch.device("cpu"), steps_per_epoch=10)


def test_without_torchao_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(optional._PACKAGES, "torchao", ("ijepa_fast_no_such_module", optional.install_hint("torchao")))
    optional._try_import.cache_clear()
    try:
        with pytest.raises(optional.MissingDependencyError, match=r"speed.fp8_target.*ijepa_fast\[fp8\]"):
            fp8.Float8ForwardLinear(torch.nn.Linear(8, 8), "rowwise", emulate=True)
    finally:
        optional._try_import.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and fp8.float8_tensor_cores(torch.device("cuda"))),
    reason="needs a GPU with float8 tensor cores",
)
@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_on_the_gpu_scaled_mm_agrees_with_the_emulation(recipe):
    """The real float8 GEMM (fast accumulation) against torchao's emulation of the same operands."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(1280, 5120).cuda()
    x = torch.randn(4096, 1280, device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        real = fp8.Float8ForwardLinear(linear, recipe, emulate=False)(x).float()
        emulated = fp8.Float8ForwardLinear(linear, recipe, emulate=True)(x).float()
    assert ((real - emulated).norm() / emulated.norm()).item() < 2**-7  # bf16 output rounding and accumulation order


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and fp8.float8_tensor_cores(torch.device("cuda"))),
    reason="needs a GPU with float8 tensor cores",
)
def test_on_the_gpu_compiled_float8_blocks_agree_with_eager_ones_and_follow_requantisation():
    """As the step runs them: compiled blocks, bf16 autocast; a requantised weight reaches the compiled
    forward (the buffers are updated in place, no recompile needed)."""
    from ijepa_fast.models.vit import compile_blocks

    enc = encoder().cuda()
    fp8.quantize_target_linears(enc, "rowwise", emulate=False)
    images = torch.randn(8, 3, 32, 32, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        eager = enc(images).float()
        compiled = copy.deepcopy(enc)
        compile_blocks(compiled)
        got = compiled(images).float()
        assert ((got - eager).norm() / eager.norm()).item() < 2**-6
        for layer in fp8.float8_linears(compiled):
            layer.weight.mul_(0.5)
            layer.requantize()
        halved = compiled(images).float()
    assert not torch.allclose(halved, got)
