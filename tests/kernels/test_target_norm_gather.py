"""target_norm_gather: LayerNorm (no affine) of only the gathered rows, against the references.

The Triton kernel runs through the interpreter (see conftest.py); sizes stay tiny.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ijepa_fast.kernels.target_norm_gather as tng
from ijepa_fast.kernels.inputs import make_gather_inputs
from ijepa_fast.kernels.target_norm_gather import target_norm_gather, target_norm_gather_reference

from .conftest import assert_lowp_close
from .test_masked_gather import SHAPES


def _authors(h: torch.Tensor, idx: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The authors' targets: normalise all N tokens, then gather the blocks (apply_masks order)."""
    M, B, K = idx.shape
    rows = torch.arange(B, device=h.device).view(1, B, 1)
    return F.layer_norm(h, (h.size(-1),), eps=eps)[rows, idx].reshape(M * B, K, -1)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_reference(triton_path, shape):
    t = make_gather_inputs(*shape, seed=sum(shape))
    h, idx = t["x"].detach() * 3 + 1, t["idx"]  # a non-zero mean and a non-unit scale
    out = target_norm_gather(h, idx)
    torch.testing.assert_close(out, target_norm_gather_reference(h, idx), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, _authors(h, idx), rtol=1e-5, atol=1e-5)
    assert out.shape == (shape[3] * shape[0], shape[4], shape[2])


def test_eps_and_constant_rows(triton_path):
    h = torch.randn(2, 6, 33)
    h[1, 2] = 4.0  # a constant row: variance 0, output 0 (the eps keeps it finite)
    idx = torch.tensor([[[0, 2, 5]], [[2, 2, 1]]]).permute(1, 0, 2).contiguous()  # (1, 2, 3)
    for eps in (1e-5, 1e-6, 0.5):
        torch.testing.assert_close(target_norm_gather(h, idx, eps), _authors(h, idx, eps), rtol=1e-5, atol=1e-5)
    assert target_norm_gather(h, idx)[1, 0].abs().max() == 0


def test_bf16_within_twice_torch_error(triton_path):
    t = make_gather_inputs(3, 7, 123, 4, 5, dtype=torch.bfloat16, seed=12)
    h, idx = t["x"].detach(), t["idx"]
    out = target_norm_gather(h, idx)
    assert out.dtype == torch.bfloat16
    assert_lowp_close(out, _authors(h.double(), idx), _authors(h, idx), "bf16 output", truncating=True)


def test_gradient_matches_reference(triton_path):
    """Targets run under no_grad, but the op is differentiable anyway (duplicates scatter-add)."""
    t = make_gather_inputs(2, 5, 9, 3, 4, seed=13)
    h, idx = t["x"], t["idx"]
    g = torch.randn(6, 4, 9)
    (got,) = torch.autograd.grad(target_norm_gather(h, idx), h, g)
    (want,) = torch.autograd.grad(target_norm_gather_reference(h, idx), h, g)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64(reference_path):
    h = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 4, (2, 2, 3))
    assert torch.autograd.gradcheck(lambda h: target_norm_gather(h, idx), (h,))


def test_non_contiguous_and_2d_index(triton_path):
    h = torch.randn(2, 9, 6).transpose(1, 2)  # (B, N=6, D=9) with stride(-1) != 1
    idx = torch.randint(0, 6, (2, 4))
    torch.testing.assert_close(target_norm_gather(h, idx), _authors(h, idx[None]), rtol=1e-5, atol=1e-5)


def test_strided_rows_are_read_in_place(triton_path, monkeypatch):
    """Rows with a feature stride (a transposed view) reach the kernel uncopied; output and gradient
    match the reference in fp32 and, within twice PyTorch's own error, in bf16."""
    kernel, received = tng._kernel(), []

    class Spy:
        def __getitem__(self, grid):
            def run(h, *args, **kwargs):
                received.append(h.data_ptr())
                return kernel[grid](h, *args, **kwargs)

            return run

    monkeypatch.setattr(tng, "_kernel", lambda: Spy())
    t = make_gather_inputs(3, 7, 123, 2, 4, seed=15, patch_strides=True)
    h, idx, g = t["x"], t["idx"], torch.randn(6, 4, 123)
    out = target_norm_gather(h, idx)
    assert received == [h.data_ptr()]
    torch.testing.assert_close(out, _authors(h, idx), rtol=1e-5, atol=1e-5)
    (got,) = torch.autograd.grad(out, h, g)
    (want,) = torch.autograd.grad(target_norm_gather_reference(h, idx), h, g)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    hb = h.detach().bfloat16()  # .bfloat16() keeps the strides
    assert hb.stride() == h.stride()
    out = target_norm_gather(hb, idx)
    assert_lowp_close(out, _authors(hb.double(), idx), _authors(hb, idx), "strided bf16 output", truncating=True)


def test_bad_inputs(triton_path):
    h = torch.randn(2, 5, 4)
    with pytest.raises(TypeError, match="idx must be int64 or int32"):
        target_norm_gather(h, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="h must have 3 dimensions"):
        target_norm_gather(h[0], torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="eps must be > 0"):
        target_norm_gather(h, torch.zeros(2, 3, dtype=torch.long), eps=0.0)
    bad = torch.tensor([[0, 5, 1], [2, 3, 4]])
    assert target_norm_gather(h, bad)[0, 1].abs().max() == 0  # Triton path: reads zeros, no fault
    with pytest.raises(IndexError, match=r"outside \[0, 5\)"):
        target_norm_gather(h, bad, debug=True)
    with pytest.raises(IndexError, match=r"outside \[0, 5\)"):
        target_norm_gather_reference(h, bad)


def test_wide_rows_take_the_reference(triton_path, monkeypatch):
    monkeypatch.setattr(tng, "_MAX_D", 4)
    h, idx = torch.randn(2, 5, 7), torch.randint(0, 5, (1, 2, 3))
    torch.testing.assert_close(target_norm_gather(h, idx), _authors(h, idx), rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph(reference_path):
    h, idx = torch.randn(2, 6, 8), torch.randint(0, 6, (3, 2, 4))

    def f(h, idx):
        with torch.no_grad():
            return target_norm_gather(h, idx) * 2

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(h, idx)
    torch.testing.assert_close(got, f(h, idx))
    torch.library.opcheck(torch.ops.ijepa_fast.target_norm_gather, (h, idx, 1e-5, False))


@pytest.mark.gpu
def test_bf16_on_gpu():
    t = make_gather_inputs(128, 256, 1280, 4, 43, dtype=torch.bfloat16, device="cuda", seed=14, unique=True)
    h, idx = t["x"].detach(), t["idx"]
    out = target_norm_gather(h, idx)
    assert_lowp_close(out, _authors(h.double(), idx), _authors(h, idx), "bf16 output on GPU", truncating=False)
