"""Fused target normalise-and-gather: LayerNorm (no affine) of only the target rows.

The authors normalise all N tokens of the target encoder's output with ``F.layer_norm`` (default
eps 1e-5) and then gather the target blocks. Each output row depends only on its own input row, so
normalising just the gathered rows gives the same result while reading M*K rows per image instead of
writing and re-reading all N.

h [B, N, D], idx [M, B, K] -> out [M*B, K, D], ``out[m*B + b, k] = layer_norm(h[b, idx[m, b, k]])``,
statistics in fp32, output in h's dtype. Targets are computed under no_grad; the backward exists
anyway (plain PyTorch plus the gather's scatter kernel) so the op is safe to use anywhere.
"""

from __future__ import annotations

import torch

from ijepa_fast.kernels import _dispatch as dsp
from ijepa_fast.kernels.masked_gather import scatter_rows

# Rows per program times padded row width: ~4096 elements, as for the gather (untuned on a GPU).
_ELEMS = 4096
# Widest row held in one tile; wider rows take the reference (no I-JEPA model is near this).
_MAX_D = 16384


@dsp.lazy_jit
def _kernel():
    """The normalise-and-gather kernel."""
    triton = dsp.triton_module()
    tl = triton.language

    @triton.jit
    def norm_gather_kernel(
        h_ptr, idx_ptr, out_ptr, rows, K, B, N, D, shb, shn, shd, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        # One program: BLOCK_R output rows (flat over M*B*K), each whole row in one tile.
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        r_ok = r < rows
        n = tl.load(idx_ptr + r, mask=r_ok, other=0).to(tl.int64)
        b = ((r // K) % B).to(tl.int64)
        d_ok = (d < D)[None, :]
        load_ok = (r_ok & (n >= 0) & (n < N))[:, None] & d_ok  # bad indices read zeros, never fault
        h_offs = (b * shb + n * shn)[:, None] + (d * shd)[None, :]  # shd == 1 is specialised: contiguous loads
        x = tl.load(h_ptr + h_offs, mask=load_ok, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        # Two-pass variance on the tile in registers: as accurate as torch's, no extra memory pass.
        xc = tl.where(d_ok, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / D
        rstd = 1.0 / tl.sqrt(var + eps)
        out_offs = r.to(tl.int64)[:, None] * D + d[None, :]
        tl.store(out_ptr + out_offs, (xc * rstd[:, None]).to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok)

    return norm_gather_kernel


def _launch(h: torch.Tensor, idx: torch.Tensor, eps: float) -> torch.Tensor:
    """h [B, N, D] (any strides, read in place), idx [M, B, K] -> [M*B, K, D] through the Triton kernel."""
    M, B, K = idx.shape
    D = h.size(-1)
    out = torch.empty((M * B, K, D), dtype=h.dtype, device=h.device)
    if out.numel() == 0:
        return out
    block_d = dsp.next_pow2(D)
    rows = M * B * K
    block_r = max(1, min(_ELEMS // block_d, dsp.next_pow2(rows)))
    grid = (-(-rows // block_r),)
    dsp.launch(
        _kernel(),
        grid,
        h.device,
        h,
        idx.contiguous(),
        out,
        rows,
        K,
        B,
        h.size(1),
        D,
        h.stride(0),
        h.stride(1),
        h.stride(2) if D > 1 else 1,
        float(eps),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
    )
    return out


def _reference(h: torch.Tensor, idx: torch.Tensor, eps: float) -> torch.Tensor:
    M, B, K = idx.shape
    rows = h[torch.arange(B, device=h.device).view(1, B, 1), idx.long()]  # (M, B, K, D)
    return torch.nn.functional.layer_norm(rows, (h.size(-1),), eps=eps).reshape(M * B, K, -1)


def target_norm_gather_reference(h: torch.Tensor, idx: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Plain PyTorch: gather the rows idx of h [B, N, D], then ``F.layer_norm`` -> [M*B, K, D]."""
    idx = dsp.check_index(idx, "idx", h.size(0), h.device)
    dsp.check_range(idx, h.size(1))
    return _reference(h, idx, eps)


@torch.library.custom_op("ijepa_fast::target_norm_gather", mutates_args=())
def _norm_gather_op(h: torch.Tensor, idx: torch.Tensor, eps: float, debug: bool) -> torch.Tensor:
    if dsp.use_triton(h.device) and h.size(-1) <= _MAX_D:
        if dsp.debug_enabled(debug):
            dsp.check_range(idx, h.size(1))
        return _launch(h, idx, eps)
    dsp.check_range(idx, h.size(1))
    return _reference(h, idx, eps)


@_norm_gather_op.register_fake
def _(h, idx, eps, debug):
    M, B, K = idx.shape
    return h.new_empty((M * B, K, h.size(-1)))


class TargetNormGather(torch.autograd.Function):
    """Forward through the kernel; backward = LayerNorm's row gradient, scattered back into h."""

    @staticmethod
    def forward(ctx, h, idx, eps, debug):
        ctx.save_for_backward(h, idx)
        ctx.eps = eps
        return _norm_gather_op(h, idx, eps, debug)

    @staticmethod
    def backward(ctx, grad):
        h, idx = ctx.saved_tensors
        M, B, K = idx.shape
        x = h[torch.arange(B, device=h.device).view(1, B, 1), idx.long()].float()  # (M, B, K, D)
        x = x.reshape(M * B, K, -1)
        mean = x.mean(-1, keepdim=True)
        rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + ctx.eps)
        xhat = (x - mean) * rstd
        g = grad.float()
        # d layer_norm(x) / dx applied to g, per row: rstd * (g - mean(g) - xhat * mean(g * xhat))
        dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
        return scatter_rows(dx, idx, h.shape, h.size(1), h.dtype), None, None, None


def target_norm_gather(h: torch.Tensor, idx: torch.Tensor, eps: float = 1e-5, *, debug: bool = False) -> torch.Tensor:
    """LayerNorm (no affine, ``eps``) of the target rows: h [B, N, D], idx [B, K] or [M, B, K] -> [M*B, K, D].

    Equal to ``apply_masks(F.layer_norm(h, (D,), eps=eps), idx)``, the authors' targets, in h's dtype.
    """
    dsp.check_tensor(h, "h", 3)
    idx = dsp.check_index(idx, "idx", h.size(0), h.device)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return TargetNormGather.apply(h, idx, float(eps), debug)
