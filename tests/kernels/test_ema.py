"""ema_update_: the fused EMA against fp64 math and the authors' loop, on awkward sets of tensors.

The Triton kernel runs through the interpreter (see conftest.py). ``_BLOCK``/``_ITERS`` are shrunk
so that tiny tensors still cross chunk and block edges. The inputs come from ``kernels/inputs.py``,
as the benchmark's (profiling/bench_ema.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from ijepa_fast.kernels import ema
from ijepa_fast.kernels.ema import ema_update_, ema_update_foreach, ema_update_reference
from ijepa_fast.kernels.inputs import make_ema_inputs, vit_param_shapes

from .conftest import assert_lowp_close

# Around the shrunk chunk (16 x 2 = 32 elements): 1, 31, 32, 33, 65; a 0-d tensor; an empty one.
SHAPES = [(3, 5), (31,), (32,), (33,), (5, 13), (1,), (), (0, 4), (2, 3, 7)]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(ema, "_BLOCK", 16)
    monkeypatch.setattr(ema, "_ITERS", 2)


def _fp64(ts, ss, m: float) -> list[torch.Tensor]:
    m32 = torch.tensor(m, dtype=torch.float32).double()  # the kernel's momentum is fp32
    return [m32 * t.double() + (1 - m32) * s.double() for t, s in zip(ts, ss)]


def _clone(xs):
    return None if xs is None else [x.clone() for x in xs]


@pytest.mark.parametrize("momentum", [0.996, "tensor", 0.0, 1.0])
def test_fp32_matches_reference(triton_path, small_chunks, momentum):
    ts, ss, outs = make_ema_inputs(SHAPES, bf16_out=True, seed=1)
    m = torch.tensor(0.9995) if momentum == "tensor" else momentum
    ts_ref, want = _clone(ts), _fp64(ts, ss, float(m))
    ema_update_reference(ts_ref, ss, torch.tensor(float(m)))
    ema_update_(ts, ss, m, outs)
    for t, r, w, o in zip(ts, ts_ref, want, outs):
        torch.testing.assert_close(t, r, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(t.double(), w, rtol=2e-7, atol=1e-7)
        # the copy: one fp32 -> bf16 rounding (truncation in the interpreter: within one ulp)
        torch.testing.assert_close(o.float(), t, rtol=2**-7, atol=0)
    if momentum in (0.0, 1.0):
        expected = ss if momentum == 0.0 else ts_ref
        assert all(torch.equal(t, e) for t, e in zip(ts, expected))


@pytest.mark.parametrize("s_dtype", [torch.float32, torch.bfloat16])
def test_bf16_targets_within_twice_torch_error(triton_path, small_chunks, s_dtype):
    """bf16 targets: fp32 math inside, one rounding; PyTorch's bf16 loop rounds after every op."""
    ts, ss, outs = make_ema_inputs(SHAPES, torch.bfloat16, s_dtype, bf16_out=True, seed=2)
    want = _fp64(ts, ss, 0.99)
    ts_torch = _clone(ts)
    for t, s in zip(ts_torch, ss):  # the authors' loop, in bf16 as PyTorch runs it
        t.mul_(0.99).add_((1 - 0.99) * s.to(torch.bfloat16))
    ema_update_(ts, ss, 0.99, outs)
    for i, (t, t_torch, w, o) in enumerate(zip(ts, ts_torch, want, outs)):
        if t.numel():
            assert_lowp_close(t, w, t_torch, f"targets[{i}]", truncating=True)
        assert torch.equal(o, t)


def test_flat_buffers_and_mixed_groups(triton_path, small_chunks):
    """ZeRO-style flat 1-D partitions next to ordinary tensors of other dtypes, in one call."""
    shapes = [(1000,), (7, 3), (257,)]
    ts, ss, _ = make_ema_inputs(shapes, seed=3)
    tb, sb, _ = make_ema_inputs(shapes, torch.bfloat16, torch.float32, seed=4)
    targets, sources = [ts[0], tb[0], ts[1], tb[1], ts[2], tb[2]], [ss[0], sb[0], ss[1], sb[1], ss[2], sb[2]]
    want = _fp64(targets, sources, 0.9)
    ema_update_(targets, sources, 0.9)
    for t, w in zip(targets, want):
        tol = 1e-6 if t.dtype == torch.float32 else 2**-7
        torch.testing.assert_close(t.double(), w, rtol=tol, atol=tol)


def test_views_parameters_and_non_contiguous(triton_path, small_chunks):
    """Slices of one flat buffer, nn.Parameters that require grad, and a transposed (strided) pair."""
    flat_t, flat_s = torch.randn(100), torch.randn(100)
    lin_t, lin_s = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    strided_t, strided_s = torch.randn(4, 6).t(), torch.randn(4, 6).t()
    targets = [flat_t[3:40], flat_t[40:], *lin_t.parameters(), strided_t]
    sources = [flat_s[3:40], flat_s[40:], *lin_s.parameters(), strided_s]
    want = _fp64(targets, sources, 0.95)
    ema_update_(targets, sources, 0.95)
    for t, w in zip(targets, want):
        torch.testing.assert_close(t.detach().double(), w, rtol=1e-6, atol=1e-6)
    assert lin_t.weight.requires_grad and lin_t.weight.grad is None


def test_table_is_cached_per_set_of_tensors(triton_path, small_chunks):
    ts, ss, _ = make_ema_inputs([(40,), (3,)], seed=5)
    ema._TABLE_CACHE.clear()
    ema_update_(ts, ss, 0.9)
    ema_update_(ts, ss, torch.tensor(0.8))
    assert len(ema._TABLE_CACHE) == 1


def test_builtin_matches(reference_path):
    ts, ss, outs = make_ema_inputs(SHAPES, bf16_out=True, seed=6)
    want = _fp64(ts, ss, 0.99)
    ema_update_foreach(ts, ss, 0.99, outs)
    for t, w, o in zip(ts, want, outs):
        torch.testing.assert_close(t.double(), w, rtol=1e-6, atol=1e-6)
        assert torch.equal(o, t.bfloat16())


def test_cpu_path_is_the_reference(reference_path):
    ts, ss, outs = make_ema_inputs(SHAPES, bf16_out=True, seed=7)
    ts_ref = _clone(ts)
    ema_update_reference(ts_ref, ss, torch.tensor(0.97))
    ema_update_(ts, ss, 0.97, outs)
    assert all(torch.equal(t, r) for t, r in zip(ts, ts_ref))
    assert all(torch.equal(o, t.bfloat16()) for o, t in zip(outs, ts))


def _bits(xs) -> list[torch.Tensor]:
    return [x.reshape(-1).contiguous().view(torch.uint8).clone() for x in xs]


@pytest.mark.parametrize("path", ["triton_path", "reference_path"])
@pytest.mark.parametrize("t_dtype", [torch.float32, torch.bfloat16])
def test_apply_false_keeps_every_bit_and_true_changes_nothing_else(request, small_chunks, path, t_dtype):
    """apply=False (a skipped training step): targets and bf16 copies keep their bits, -0.0 and NaN
    included, on the kernel and on its reference, strided pairs too; apply=True gives the same bits
    as a call without it."""
    request.getfixturevalue(path)
    shapes = [*SHAPES, (1000,)]
    ts, ss, outs = make_ema_inputs(shapes, t_dtype, bf16_out=True, seed=10)
    ts[0].view(-1)[:3] = torch.tensor([-0.0, float("nan"), float("inf")])
    strided_t, strided_s = torch.randn(4, 6).t().to(t_dtype), torch.randn(4, 6).t()
    ts, ss, outs = [*ts, strided_t], [*ss, strided_s], [*outs, torch.zeros(6, 4, dtype=torch.bfloat16)]
    t_bits, o_bits = _bits(ts), _bits(outs)
    ema_update_(ts, ss, 0.99, outs, apply=torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(_bits(ts), t_bits))
    assert all(torch.equal(a, b) for a, b in zip(_bits(outs), o_bits))
    plain_t, plain_o = _clone(ts), _clone(outs)
    ema_update_(plain_t, ss, 0.99, plain_o)
    ema_update_(ts, ss, torch.tensor(0.99), outs, apply=torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(_bits(ts), _bits(plain_t)))
    assert all(torch.equal(a, b) for a, b in zip(_bits(outs), _bits(plain_o)))
    assert not torch.equal(_bits(ts)[-2], t_bits[-2])  # applied: the 1000-element target moved


def test_reference_with_apply_false_keeps_every_bit():
    ts, ss, outs = make_ema_inputs(SHAPES, bf16_out=True, seed=11)
    t_bits, o_bits = _bits(ts), _bits(outs)
    ema_update_reference(ts, ss, torch.tensor(0.9), outs, apply=torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(_bits(ts), t_bits))
    assert all(torch.equal(a, b) for a, b in zip(_bits(outs), o_bits))


def test_vith14_has_631m_parameters():
    n = sum(torch.Size(s).numel() for s in vit_param_shapes(depth=32, width=1280, patch=14, grid=16))
    assert 630e6 < n < 632e6


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_argument():
    ts, ss, outs = make_ema_inputs([(3,), (4, 2)], bf16_out=True)
    with pytest.raises(ValueError, match="targets has 2 tensors but sources has 1"):
        ema_update_(ts, ss[:1], 0.9)
    with pytest.raises(ValueError, match=r"targets\[1\] has shape \(4, 2\) but sources\[1\] has \(8,\)"):
        ema_update_(ts, [ss[0], ss[1].flatten()], 0.9)
    with pytest.raises(TypeError, match=r"targets\[0\] must be float32 or bfloat16"):
        ema_update_([ts[0].half(), ts[1]], ss, 0.9)
    with pytest.raises(TypeError, match=r"sources\[1\] must be floating point"):
        ema_update_(ts, [ss[0], ss[1].long()], 0.9)
    with pytest.raises(ValueError, match=r"bf16_out\[0\] must be bfloat16"):
        ema_update_(ts, ss, 0.9, [outs[0].float(), outs[1]])
    with pytest.raises(ValueError, match="bf16_out has 1 tensors"):
        ema_update_(ts, ss, 0.9, outs[:1])
    with pytest.raises(ValueError, match=r"sources\[0\] is on meta"):
        ema_update_(ts, [ss[0].to("meta"), ss[1]], 0.9)
    with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\]"):
        ema_update_(ts, ss, 1.5)
    with pytest.raises(ValueError, match="one-element tensor"):
        ema_update_(ts, ss, torch.tensor([0.9, 0.8]))
    with pytest.raises(ValueError, match="apply must be a one-element bool tensor"):
        ema_update_(ts, ss, 0.9, apply=torch.tensor(1.0))
    ema_update_([], [], 0.9)  # nothing to do is fine


# ----------------------------------------------------------------------------- torch.compile


def test_torch_compile_fullgraph(reference_path):
    ts, ss, outs = make_ema_inputs([(5, 3), (7,)], bf16_out=True, seed=8)
    ts_ref = _clone(ts)
    ema_update_reference(ts_ref, ss, torch.tensor(0.9))

    def step(ts, ss, m, outs):
        ema_update_(ts, ss, m, outs)

    torch.compile(step, fullgraph=True, backend="aot_eager")(ts, ss, torch.tensor(0.9), outs)
    assert all(torch.equal(t, r) for t, r in zip(ts, ts_ref))
    assert all(torch.equal(o, t.bfloat16()) for o, t in zip(outs, ts))

    def skipped(ts, ss, m, outs):
        ema_update_(ts, ss, m, outs, apply=torch.zeros((), dtype=torch.bool))

    torch.compile(skipped, fullgraph=True, backend="aot_eager")(ts, ss, torch.tensor(0.9), outs)
    assert all(torch.equal(t, r) for t, r in zip(ts, ts_ref))


def _some_copies(outs: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Copies for every other tensor, as ``speed.bf16_target_copy`` has for the matmul weights only."""
    return [o if i % 2 == 0 else None for i, o in enumerate(outs)]


@pytest.mark.parametrize("apply", [None, True, False])
def test_copies_of_some_tensors_are_the_cast_bit_for_bit(reference_path, small_chunks, apply):
    """bf16_out with None entries (the CPU path): each copy holds exactly ``t.to(bfloat16)`` (autocast's
    cast) after the update, the others are updated alike; apply=False keeps every bit of both."""
    ts, ss, outs = make_ema_inputs([*SHAPES, (7, 129)], bf16_out=True, seed=12)
    copies = _some_copies(outs)
    for t, o in zip(ts, copies):
        if o is not None:
            o.copy_(t)
    want_t, t_bits, o_bits = _clone(ts), _bits(ts), _bits(outs)
    ema_update_reference(want_t, ss, torch.tensor(0.97))
    flag = None if apply is None else torch.tensor(apply)
    ema_update_(ts, ss, 0.97, copies, apply=flag)
    if apply is False:
        assert all(torch.equal(a, b) for a, b in zip(_bits(ts), t_bits))
        assert all(torch.equal(a, b) for a, b in zip(_bits(outs), o_bits))
        return
    assert all(torch.equal(t, w) for t, w in zip(ts, want_t))
    for i, (t, o) in enumerate(zip(ts, copies)):
        if o is not None:
            assert torch.equal(o.view(torch.int16), t.to(torch.bfloat16).view(torch.int16)), i
    assert all(torch.equal(a, b) for a, b, o in zip(_bits(outs), o_bits, copies) if o is None)  # untouched


def test_kernel_with_copies_of_some_tensors(triton_path, small_chunks):
    """The kernel groups copied and uncopied tensors apart (two launches) and matches the reference;
    its copies are one rounding of the new targets (the interpreter does not round to nearest even:
    within one bf16 ulp here, bit for bit on a GPU: test_copies_on_gpu_are_the_cast)."""
    ts, ss, outs = make_ema_inputs([*SHAPES, (7, 129)], bf16_out=True, seed=13)
    copies = _some_copies(outs)
    want_t = _clone(ts)
    ema_update_reference(want_t, ss, torch.tensor(0.97))
    before = _bits(outs)
    ema_update_(ts, ss, 0.97, copies)
    for t, w, o in zip(ts, want_t, copies):
        torch.testing.assert_close(t, w, rtol=1e-6, atol=1e-7)
        if o is not None:
            torch.testing.assert_close(o.float(), t, rtol=2**-7, atol=0)
    assert all(torch.equal(a, b) for a, b, o in zip(_bits(outs), before, copies) if o is None)


def test_torch_compile_fullgraph_with_copies_of_some_tensors(reference_path):
    """Traced, the op runs once for the copied tensors and once for the others (its lists hold no None)."""
    ts, ss, outs = make_ema_inputs([(5, 3), (7,), (2, 2)], bf16_out=True, seed=15)
    copies = [outs[0], None, outs[2]]
    ts_ref = _clone(ts)
    ema_update_reference(ts_ref, ss, torch.tensor(0.9))

    def step(ts, ss, m, copies):
        ema_update_(ts, ss, m, copies)

    torch.compile(step, fullgraph=True, backend="aot_eager")(ts, ss, torch.tensor(0.9), copies)
    assert all(torch.equal(t, r) for t, r in zip(ts, ts_ref))
    assert torch.equal(outs[0], ts[0].bfloat16()) and torch.equal(outs[2], ts[2].bfloat16())
    assert bool(outs[1].isnan().all())  # no copy asked for: untouched


# ----------------------------------------------------------------------------- GPU and benchmark


def _compiled_variants(kernel) -> int:
    """How many binaries triton.jit has built for ``kernel`` (its per-device kernel caches)."""
    return sum(len(cache[0]) for cache in kernel.device_caches.values())


@pytest.mark.gpu
@pytest.mark.parametrize("t_dtype", [torch.float32, torch.bfloat16])
def test_on_gpu_and_no_recompile_per_momentum(t_dtype):
    shapes = vit_param_shapes(depth=2, width=64, patch=14, grid=16)
    ts, ss, outs = make_ema_inputs(shapes, t_dtype, torch.bfloat16, device="cuda", bf16_out=True, seed=9)
    built = None
    for m in (0.996, 0.997, torch.tensor(0.998, device="cuda")):
        want = _fp64(ts, ss, float(m))
        ts_torch = _clone(ts)
        for t, s in zip(ts_torch, ss):
            t.mul_(float(m)).add_((1 - float(m)) * s.to(t_dtype))
        ema_update_(ts, ss, m, outs)
        for i, (t, t_torch, w, o) in enumerate(zip(ts, ts_torch, want, outs)):
            if t_dtype == torch.float32:
                torch.testing.assert_close(t.double(), w, rtol=1e-6, atol=1e-6)
            else:
                assert_lowp_close(t, w, t_torch, f"targets[{i}]", truncating=False)
            assert torch.equal(o, t.bfloat16())
        built = built or _compiled_variants(ema._kernel())
        assert _compiled_variants(ema._kernel()) == built  # a new momentum never recompiles


@pytest.mark.gpu
def test_copies_on_gpu_are_the_cast():
    """On the device the kernel's copies are autocast's cast (round to nearest even) bit for bit, odd
    shapes and tensors without a copy in the same call included; apply=False keeps every bit."""
    shapes = [*SHAPES, *vit_param_shapes(depth=1, width=72, patch=14, grid=5)]
    ts, ss, outs = make_ema_inputs(shapes, device="cuda", bf16_out=True, seed=14)
    copies = _some_copies(outs)
    ema_update_(ts, ss, 0.996, copies)
    for t, o in zip(ts, copies):
        if o is not None:
            assert torch.equal(o.view(torch.int16), t.to(torch.bfloat16).view(torch.int16))
    t_bits, o_bits = _bits(ts), _bits(outs)
    ema_update_(ts, ss, 0.996, copies, apply=torch.tensor(False, device="cuda"))
    assert all(torch.equal(a, b) for a, b in zip(_bits(ts), t_bits))
    assert all(torch.equal(a, b) for a, b in zip(_bits(outs), o_bits))


def test_benchmark_runs_on_cpu(tmp_path, reference_path, capsys):
    from profiling import bench_ema

    bench_ema.main(["--device", "cpu", "--size", "tiny", "--reps", "3", "--json", str(tmp_path / "r.json")])
    assert "| case |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert {(r["case"], r["method"]) for r in rows} == {
        (c, m) for c in bench_ema.CONFIGS for m in ("authors", "builtin", "kernel")
    }
