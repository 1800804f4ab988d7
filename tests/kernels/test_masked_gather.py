"""masked_gather, masked_gather_add and mask_tokens: outputs and every gradient against the references.

The Triton kernels run through the interpreter (see conftest.py); sizes stay tiny because it is slow.
The inputs come from ``kernels/inputs.py``, as the benchmark's (profiling/bench_masked_gather.py).
"""

from __future__ import annotations

import json

import pytest
import torch

import ijepa_fast.kernels.masked_gather as mg
from ijepa_fast.kernels.inputs import make_gather_inputs
from ijepa_fast.kernels.masked_gather import (
    mask_tokens,
    mask_tokens_reference,
    masked_gather,
    masked_gather_add,
    masked_gather_add_reference,
    masked_gather_reference,
)
from ijepa_fast.models import ops
from ijepa_fast.models.vit import PatchEmbed

from .conftest import assert_lowp_close, triton_interpreted

# (B, N, D, M, K): B=1, K=1, N=1 (every index the same), D=1, D not a multiple of any block, large M.
SHAPES = [(1, 1, 1, 1, 1), (1, 5, 3, 1, 1), (2, 1, 7, 3, 2), (3, 7, 123, 2, 4), (2, 9, 5, 7, 5), (3, 7, 1, 4, 3)]


OPS = {  # name -> (fast op, reference, names of its tensor arguments)
    "gather": (masked_gather, masked_gather_reference, ("x",)),
    "gather_add": (masked_gather_add, masked_gather_add_reference, ("x", "pos")),
    "mask_tokens": (mask_tokens, mask_tokens_reference, ("mask_token", "pos")),
}


def _run(fn, inputs: dict, names: tuple, grad_out: torch.Tensor | None = None, cast=None):
    """Output and the gradients of every input that requires one (grad_out drawn when None)."""
    args = [
        inputs[n] if cast is None else inputs[n].detach().to(cast).requires_grad_(inputs[n].requires_grad)
        for n in names
    ]
    out = fn(*args, inputs["idx"])
    if grad_out is None:
        grad_out = torch.randn_like(out)
    wrt = [a for a in args if a.requires_grad]
    grads = torch.autograd.grad(out, wrt, grad_out.to(out.dtype))
    return out, grads, grad_out


def assert_grads_within_sum_bound(fast, ref, inputs: dict, names: tuple, grads, g: torch.Tensor) -> None:
    """fp32 gradients against the float64 reference, within the worst-case bound of an fp32 sum in
    any order: n * eps * sum(|terms|). Each gradient element is a sum of selected grad_out entries
    (0/1 coefficients), so the reference applied to |grad_out| gives sum(|terms|) exactly; n is at
    most M * B * K. A wrong index or a lost term misses by O(|term|), far above the bound; a fixed
    1e-6 tolerance failed on CI for a 70-term sum that was only reordered (1.9e-6 off)."""
    _, want, _ = _run(ref, inputs, names, g, cast=torch.float64)
    _, magnitude, _ = _run(ref, inputs, names, g.abs(), cast=torch.float64)
    n_terms = inputs["idx"].numel()
    eps = torch.finfo(torch.float32).eps
    for got, w, mag in zip(grads, want, magnitude):
        err = (got.double() - w).abs()
        bound = n_terms * eps * mag + 1e-12
        assert torch.all(err <= bound), f"max error {err.max():.3g} over the bound {bound.flatten()[err.argmax()]:.3g}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", list(OPS))
def test_fp32_matches_reference(triton_path, op, shape):
    fast, ref, names = OPS[op]
    inputs = make_gather_inputs(*shape, seed=sum(shape))
    out, grads, g = _run(fast, inputs, names)
    out_ref, grads_ref, _ = _run(ref, inputs, names, g)
    assert out.shape == (shape[3] * shape[0], shape[4], shape[2]) and out.dtype == out_ref.dtype
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)  # a copy (plus one fp32 add): exact
    assert [x.shape for x in grads] == [x.shape for x in grads_ref]
    assert_grads_within_sum_bound(fast, ref, inputs, names, grads, g)  # sums in another order


@pytest.mark.parametrize("op", ["gather_add", "mask_tokens"])
def test_pos_per_image_and_pos_without_grad(triton_path, op):
    fast, ref, names = OPS[op]
    for pos_batch, pos_grad in ((3, True), (1, False)):
        inputs = make_gather_inputs(3, 6, 10, 4, 3, seed=pos_batch, pos_batch=pos_batch, pos_grad=pos_grad)
        out, grads, g = _run(fast, inputs, names)
        out_ref, grads_ref, _ = _run(ref, inputs, names, g)
        assert len(grads) == len(grads_ref) == (2 if pos_grad else 1)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
        assert_grads_within_sum_bound(fast, ref, inputs, names, grads, g)


def test_overlapping_blocks_and_int32_indices(triton_path):
    """Every block the same indices (full overlap) plus a repeated index inside a block; idx int32."""
    inputs = make_gather_inputs(2, 6, 9, 1, 4, seed=3)
    block = torch.tensor([[0, 5, 5, 2], [1, 1, 4, 0]])
    inputs["idx"] = block.expand(5, 2, 4).to(torch.int32)
    out, (gx,), g = _run(masked_gather, inputs, ("x",))
    out_ref, (gx_ref,), _ = _run(masked_gather_reference, inputs, ("x",), g)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    assert gx.shape == gx_ref.shape
    assert_grads_within_sum_bound(masked_gather, masked_gather_reference, inputs, ("x",), (gx,), g)
    assert gx[0, 3].abs().max() == 0  # a row no block took gets a zero gradient, written by the kernel


def test_two_d_index_is_one_block(triton_path):
    inputs = make_gather_inputs(2, 8, 4, 1, 3, seed=4)
    out2 = masked_gather(inputs["x"], inputs["idx"][0])
    torch.testing.assert_close(out2, masked_gather(inputs["x"], inputs["idx"]), rtol=0, atol=0)


def test_patch_embed_tokens_reach_the_kernel_in_place(triton_path, monkeypatch):
    """No copy before the context gather: the kernel reads PatchEmbed's output where it lies
    (contiguous: its convolution runs channels-last), and gives the authors' gather of x + pos exactly."""
    gather_add, segment_sum = mg._kernels()
    received = []

    class Spy:
        def __getitem__(self, grid):
            def run(x, *args, **kwargs):
                received.append((x.data_ptr(), x.stride()))
                return gather_add[grid](x, *args, **kwargs)

            return run

    monkeypatch.setattr(mg, "_kernels", lambda: (Spy(), segment_sum))
    x = PatchEmbed(patch_size=4, embed_dim=37)(torch.randn(3, 3, 12, 28))  # (B=3, N=21, D=37)
    pos, idx = torch.randn(1, 21, 37), torch.randint(0, 21, (1, 3, 5))
    out = ops.gather_tokens_with_pos(x, pos, idx)
    assert received == [(x.data_ptr(), (21 * 37, 37, 1))]
    torch.testing.assert_close(out, ops.gather_tokens_with_pos(x, pos, idx, fused=False), rtol=0, atol=0)


@pytest.mark.parametrize(
    "shape", [(3, 7, 123, 2, 4), (2, 9, 5, 7, 5), (1, 5, 3, 1, 1)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("op", ["gather", "gather_add"])
def test_patch_layout_tokens_fp32(triton_path, op, shape):
    """Tokens laid out as a convolution gives them on NCHW images (a transposed view): the output
    exact, every gradient within the sum bound."""
    fast, ref, names = OPS[op]
    N, D = shape[1:3]
    inputs = make_gather_inputs(*shape, seed=sum(shape), patch_strides=True)
    assert inputs["x"].stride() == (N * D, 1, N)
    out, grads, g = _run(fast, inputs, names)
    out_ref, grads_ref, _ = _run(ref, inputs, names, g)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    assert [x.shape for x in grads] == [x.shape for x in grads_ref]
    assert_grads_within_sum_bound(fast, ref, inputs, names, grads, g)


@pytest.mark.parametrize(
    "op,patch_strides", [(op, False) for op in OPS] + [("gather", True), ("gather_add", True)], ids=str
)
def test_bf16_within_twice_torch_error(triton_path, op, patch_strides):
    """bf16 inputs: compared with a float64 reference, bounded by PyTorch's own bf16 error (see conftest)."""
    _check_bf16(op, "cpu", truncating=True, patch_strides=patch_strides)


def _check_bf16(op: str, device: str, truncating: bool, patch_strides: bool = False) -> None:
    fast, ref, names = OPS[op]
    inputs = make_gather_inputs(
        3, 7, 123, 4, 5, dtype=torch.bfloat16, device=device, seed=11, patch_strides=patch_strides
    )
    out, grads, g = _run(fast, inputs, names)
    out_t, grads_t, _ = _run(ref, inputs, names, g)  # PyTorch in bf16
    out64, grads64, _ = _run(ref, inputs, names, g.double(), cast=torch.float64)
    assert out.dtype == torch.bfloat16
    assert_lowp_close(out, out64, out_t, f"{op} output", truncating)
    for i, (got, t, want) in enumerate(zip(grads, grads_t, grads64)):
        assert got.dtype == torch.bfloat16
        assert_lowp_close(got, want, t, f"{op} grad {i}", truncating)


def test_bf16_tokens_fp32_pos_promote_like_torch(triton_path):
    inputs = make_gather_inputs(2, 5, 6, 2, 3, seed=5)
    x = inputs["x"].detach().bfloat16().requires_grad_()
    out = masked_gather_add(x, inputs["pos"], inputs["idx"])
    ref = masked_gather_add_reference(x, inputs["pos"], inputs["idx"])
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    gx, gp = torch.autograd.grad(out, (x, inputs["pos"]), g)
    gx_ref, gp_ref = torch.autograd.grad(ref, (x, inputs["pos"]), g)
    assert gx.dtype == torch.bfloat16 and gp.dtype == torch.float32
    torch.testing.assert_close(gp, gp_ref, rtol=1e-5, atol=1e-5)  # <= 12-term fp32 sums, in another order
    torch.testing.assert_close(gx.float(), gx_ref.float(), rtol=1e-2, atol=1e-2)  # one bf16 rounding each


def test_dispatch(monkeypatch):
    """TRITON_INTERPRET=1 sends CPU tensors to the kernel launcher; without it they take the reference."""
    calls = []
    real = mg._launch_gather_add
    monkeypatch.setattr(mg, "_launch_gather_add", lambda *a: calls.append(1) or real(*a))
    inputs = make_gather_inputs(2, 4, 3, 1, 2)
    masked_gather(inputs["x"], inputs["idx"])
    expected = 1 if triton_interpreted() else 0
    assert len(calls) == expected
    monkeypatch.delenv("TRITON_INTERPRET")
    masked_gather(inputs["x"], inputs["idx"])
    assert len(calls) == expected


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 5, 3)
    idx = torch.randint(0, 5, (2, 2, 4))
    with pytest.raises(TypeError, match="idx must be int64 or int32"):
        masked_gather(x, idx.float())
    with pytest.raises(ValueError, match=r"idx must be \[B, K\] or \[M, B, K\]"):
        masked_gather(x, idx[0, 0])
    with pytest.raises(ValueError, match="idx has batch size 3"):
        masked_gather(x, torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        masked_gather(x[0], idx)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        masked_gather(x.long(), idx)
    with pytest.raises(TypeError, match="idx must be a torch.Tensor"):
        masked_gather(x, [[0, 1]])
    with pytest.raises(ValueError, match="idx is on meta"):
        masked_gather(x, idx.to("meta"))
    with pytest.raises(ValueError, match="pos must be"):
        masked_gather_add(x, torch.randn(1, 4, 3), idx)
    with pytest.raises(ValueError, match="pos is on meta"):
        masked_gather_add(x, torch.randn(1, 5, 3, device="meta"), idx)
    with pytest.raises(ValueError, match="mask_token must be"):
        mask_tokens(torch.randn(1, 2, 3), torch.randn(1, 5, 3), idx)
    with pytest.raises(ValueError, match="pos has batch 4"):
        mask_tokens(torch.randn(1, 1, 3), torch.randn(4, 5, 3), idx)


@pytest.mark.parametrize("bad", [5, -1])
def test_out_of_range_indices(triton_path, monkeypatch, bad):
    x = torch.randn(2, 5, 3)
    idx = torch.randint(0, 5, (2, 2, 4))
    idx[1, 0, 2] = bad
    # Triton path without the debug switch: no sync, no error, no fault: the bad row reads zeros.
    out = masked_gather(x, idx)
    assert out[2, 2].abs().max() == 0
    with pytest.raises(IndexError, match=r"outside \[0, 5\)"):
        masked_gather(x, idx, debug=True)
    monkeypatch.setenv("IJEPA_FAST_DEBUG", "1")
    with pytest.raises(IndexError, match=r"outside \[0, 5\)"):
        masked_gather(x, idx)
    monkeypatch.delenv("IJEPA_FAST_DEBUG")
    monkeypatch.delenv("TRITON_INTERPRET")  # the reference path always checks
    with pytest.raises(IndexError, match=r"outside \[0, 5\)"):
        masked_gather(x, idx)
    with pytest.raises(IndexError):
        masked_gather_reference(x, idx)


def test_out_of_range_index_adds_no_gradient(triton_path):
    x = torch.randn(2, 5, 3, requires_grad=True)
    idx = torch.tensor([[[0, 7]], [[5, 1]]]).permute(1, 0, 2).contiguous()  # (1, 2, 2): two bad indices
    (gx,) = torch.autograd.grad(masked_gather(x, idx).sum(), x)
    expected = torch.zeros(2, 5, 3)
    expected[0, 0] = 1
    expected[1, 1] = 1
    torch.testing.assert_close(gx, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- torch.compile


def test_torch_compile_fullgraph(reference_path):
    """The custom ops' fake implementations let torch.compile trace the whole step (forward and backward)."""
    inputs = make_gather_inputs(2, 6, 4, 3, 2, seed=7)

    def f(x, pos, mask_token, idx):
        return (masked_gather_add(x, pos, idx) * mask_tokens(mask_token, pos, idx)).sum() + masked_gather(x, idx).sum()

    args = (inputs["x"], inputs["pos"], inputs["mask_token"], inputs["idx"])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*args), args[:3])
    want = torch.autograd.grad(f(*args), args[:3])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_custom_ops_pass_opcheck(reference_path):
    inputs = make_gather_inputs(2, 6, 4, 3, 2, seed=8)
    x, pos, idx = inputs["x"].detach(), inputs["pos"].detach(), inputs["idx"]
    torch.library.opcheck(torch.ops.ijepa_fast.gather_add, (x, pos, idx, 6, False))
    torch.library.opcheck(torch.ops.ijepa_fast.gather_add_backward, (torch.randn(6, 2, 4), idx, 2, 6, torch.float32))


# ----------------------------------------------------------------------------- GPU and benchmark


@pytest.mark.gpu
@pytest.mark.parametrize("op", list(OPS))
def test_bf16_on_gpu(op):
    _check_bf16(op, "cuda", truncating=False)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_on_gpu(shape):
    for fast, ref, names in OPS.values():
        inputs = make_gather_inputs(*shape, device="cuda", seed=sum(shape))
        out, grads, g = _run(fast, inputs, names)
        out_ref, grads_ref, _ = _run(ref, inputs, names, g)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
        for got, want in zip(grads, grads_ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_benchmark_runs_on_cpu(tmp_path, reference_path, capsys):
    from profiling import bench_masked_gather

    bench_masked_gather.main(["--device", "cpu", "--size", "tiny", "--reps", "3", "--json", str(tmp_path / "r.json")])
    assert "| case |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"authors", "builtin", "kernel"}
    assert all(r["median_ms"] > 0 for r in rows)
