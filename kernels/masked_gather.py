"""Masked-token gather in the authors' ``apply_masks`` layout, forward and backward, with fused variants.

Layout: x [B, N, D] and idx [M, B, K] give out [M*B, K, D] with ``out[m*B + b, k] = x[b, idx[m, b, k]]``
(a 2-D idx [B, K] is one block, M = 1). Public entry points:

- ``masked_gather(x, idx)``: the gather (context tokens, targets);
- ``masked_gather_add(x, pos, idx)``: gather of ``x + pos`` with pos [1 or B, N, D], so the position
  embedding is added only to the kept tokens instead of to all N (one pass instead of two);
- ``mask_tokens(mask_token, pos, idx)``: the predictor's mask tokens for every block,
  ``mask_token [1, 1, D] + pos[b, idx]``, without materialising the repeated mask token.

All three share one forward kernel (a row gather of up to two broadcastable operands, summed in
fp32) and one backward kernel. The backward is a deterministic segmented sum, not atomics: the
destination row of every gathered row is sorted once (``torch.sort``, a few thousand keys), each
destination row then sums its sources in a fixed order in fp32 and writes its gradient once, in the
operand's dtype. That is correct when blocks share indices (target blocks overlap), moves the
minimum bytes (no fp32 buffer to zero and cast) and gives bit-identical gradients run to run.

Out-of-range indices: the reference path raises IndexError; the Triton path raises only under the
debug switch (see ``_dispatch``) and otherwise reads them as zeros and drops their gradient, so a
bad index can never fault the GPU.
"""

from __future__ import annotations

import torch

from ijepa_fast.kernels import _dispatch as dsp

# Elements per program in the forward gather: 4096 (16 KiB of fp32) is the usual size for a
# memory-bound copy; not yet tuned on a GPU.
_FWD_ELEMS = 4096
# Feature columns per program in the backward; each program loops over its sources serially.
_BWD_MAX_BLOCK_D = 1024


@dsp.lazy_jit
def _kernels():
    """(gather_add_kernel, segment_sum_kernel)."""
    triton = dsp.triton_module()
    tl = triton.language

    @triton.jit
    def gather_add_kernel(
        x_ptr,
        pos_ptr,
        idx_ptr,
        out_ptr,
        rows,
        K,
        B,
        N,
        D,
        sxb,
        sxn,
        sxd,
        spb,
        spn,
        spd,
        HAS_POS: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program: BLOCK_R output rows (flat over M*B*K) x BLOCK_D features.
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        r_ok = r < rows
        n = tl.load(idx_ptr + r, mask=r_ok, other=0).to(tl.int64)
        b = ((r // K) % B).to(tl.int64)  # idx is [M, B, K] contiguous, so its flat order is the output's
        d_ok = (d < D)[None, :]
        # Out-of-range indices read zeros instead of faulting (checked only under the debug switch).
        load_ok = (r_ok & (n >= 0) & (n < N))[:, None] & d_ok
        # Strides in elements; a feature stride of 1 is specialised by Triton into contiguous loads.
        x_offs = (b * sxb + n * sxn)[:, None] + (d * sxd)[None, :]
        acc = tl.load(x_ptr + x_offs, mask=load_ok, other=0.0).to(tl.float32)
        if HAS_POS:
            pos_offs = (b * spb + n * spn)[:, None] + (d * spd)[None, :]
            acc += tl.load(pos_ptr + pos_offs, mask=load_ok, other=0.0).to(tl.float32)
        out_offs = r.to(tl.int64)[:, None] * D + d[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok)

    @triton.jit
    def segment_sum_kernel(grad_ptr, order_ptr, offsets_ptr, out_ptr, D, BLOCK_D: tl.constexpr):
        # One program: one destination row x BLOCK_D features; sums its sources in sorted order.
        dst = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        i = tl.load(offsets_ptr + dst)
        end = tl.load(offsets_ptr + dst + 1)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        # A while loop, not range(i, end): the interpreter cannot take a loaded value as a range bound.
        while i < end:
            src = tl.load(order_ptr + i)
            acc += tl.load(grad_ptr + src * D + d, mask=d_ok, other=0.0).to(tl.float32)
            i += 1
        tl.store(out_ptr + dst.to(tl.int64) * D + d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)

    return gather_add_kernel, segment_sum_kernel


# ----------------------------------------------------------------------------- launchers


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, feature) strides of t [B', N', D]: 0 along size-1 batch and token dims so they
    broadcast, 1 for a single feature (so it takes the kernel's contiguous variant)."""
    return (
        t.stride(0) if t.size(0) > 1 else 0,
        t.stride(1) if t.size(1) > 1 else 0,
        t.stride(2) if t.size(2) > 1 else 1,
    )


def _launch_gather_add(
    x: torch.Tensor, pos: torch.Tensor | None, idx: torch.Tensor, n_tokens: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """x [1|B, 1|N, D], pos [1|B, N, D] or None, idx [M, B, K] -> [M*B, K, D] in out_dtype.

    x and pos are read in place, whatever their strides: a copy to make a strided view contiguous
    would move more bytes than the gather (PatchEmbed's tokens arrive contiguous).
    """
    M, B, K = idx.shape
    D = x.size(-1)
    out = torch.empty((M * B, K, D), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    pos_arg = x if pos is None else pos
    block_d = min(dsp.next_pow2(D), _FWD_ELEMS)
    block_r = max(1, min(_FWD_ELEMS // block_d, dsp.next_pow2(M * B * K)))
    rows = M * B * K
    grid = (_cdiv(rows, block_r), _cdiv(D, block_d))
    gather_add, _ = _kernels()
    dsp.launch(
        gather_add,
        grid,
        x.device,
        x,
        pos_arg,
        idx.contiguous(),
        out,
        rows,
        K,
        B,
        n_tokens,
        D,
        *_strides(x),
        *_strides(pos_arg),
        HAS_POS=pos is not None,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
    )
    return out


def _dest_keys(idx: torch.Tensor, batch_dst: int, n_tokens: int) -> torch.Tensor:
    """Flat destination row of every gathered row: b * N + idx (or idx when the operand has batch 1).

    Invalid indices get key -1, which no destination row claims, so they add nothing.
    """
    B = idx.size(1)
    idx = idx.long()
    keys = idx
    if batch_dst > 1:
        keys = idx + torch.arange(B, device=idx.device).view(1, B, 1) * n_tokens
    return torch.where((idx >= 0) & (idx < n_tokens), keys, -1).flatten()  # (M*B*K,)


def _launch_segment_sum(
    grad: torch.Tensor, idx: torch.Tensor, batch_dst: int, n_tokens: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """grad [M*B, K, D], idx [M, B, K] -> [batch_dst, N, D]: the scatter-add of the gather."""
    D = grad.size(-1)
    out = torch.empty((batch_dst, n_tokens, D), dtype=out_dtype, device=grad.device)
    if out.numel() == 0:
        return out
    sorted_keys, order = torch.sort(_dest_keys(idx, batch_dst, n_tokens), stable=True)
    # offsets[j] = first sorted position with key >= j: no host sync (bincount would need one).
    bounds = torch.arange(batch_dst * n_tokens + 1, device=grad.device)
    offsets = torch.searchsorted(sorted_keys, bounds)
    block_d = min(dsp.next_pow2(D), _BWD_MAX_BLOCK_D)
    grid = (batch_dst * n_tokens, _cdiv(D, block_d))
    _, segment_sum = _kernels()
    dsp.launch(segment_sum, grid, grad.device, grad.contiguous(), order, offsets, out, D, BLOCK_D=block_d)
    return out


# ----------------------------------------------------------------------------- references


def _gather_reference(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [1|B, 1|N, D], idx [M, B, K] -> [M*B, K, D] by advanced indexing (broadcast size-1 dims)."""
    M, B, K = idx.shape
    bsel = torch.arange(B, device=idx.device).view(1, B, 1) if x.size(0) > 1 else 0
    nsel = idx.long() if x.size(1) > 1 else torch.zeros_like(idx, dtype=torch.long)
    return x[bsel, nsel].reshape(M * B, K, x.size(-1))  # (M, B, K, D) -> (M*B, K, D)


def masked_gather_reference(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: x [B, N, D], idx [B, K] or [M, B, K] -> [M*B, K, D]."""
    idx = dsp.check_index(idx, "idx", x.size(0), x.device)
    dsp.check_range(idx, x.size(1))
    return _gather_reference(x, idx)


def masked_gather_add_reference(x: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: (x + pos) gathered; x [B, N, D], pos [1 or B, N, D] -> [M*B, K, D]."""
    idx = dsp.check_index(idx, "idx", x.size(0), x.device)
    dsp.check_range(idx, x.size(1))
    return _gather_reference(x, idx) + _gather_reference(pos, idx)


def mask_tokens_reference(mask_token: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: mask_token [1, 1, D] + pos[b, idx]; pos [1 or B, N, D] -> [M*B, K, D]."""
    idx = dsp.check_index(idx, "idx", idx.size(-2), pos.device)
    dsp.check_range(idx, pos.size(1))
    return mask_token + _gather_reference(pos, idx)


def _segment_sum_reference(
    grad: torch.Tensor, idx: torch.Tensor, batch_dst: int, n_tokens: int, out_dtype: torch.dtype
) -> torch.Tensor:
    keys = _dest_keys(idx, batch_dst, n_tokens)
    keep = keys >= 0
    acc = torch.zeros(batch_dst * n_tokens, grad.size(-1), dtype=torch.float32, device=grad.device)
    acc.index_add_(0, keys[keep], grad.reshape(-1, grad.size(-1))[keep].float())
    return acc.view(batch_dst, n_tokens, -1).to(out_dtype)


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("ijepa_fast::gather_add", mutates_args=())
def _gather_add_op(
    x: torch.Tensor, pos: torch.Tensor | None, idx: torch.Tensor, n_tokens: int, debug: bool
) -> torch.Tensor:
    """out[m*B+b, k] = x[b, idx] (+ pos[b, idx]); x and pos broadcast along size-1 dims."""
    out_dtype = x.dtype if pos is None else torch.promote_types(x.dtype, pos.dtype)
    if dsp.use_triton(x.device):
        if dsp.debug_enabled(debug):
            dsp.check_range(idx, n_tokens)
        return _launch_gather_add(x, pos, idx, n_tokens, out_dtype)
    dsp.check_range(idx, n_tokens)
    out = _gather_reference(x, idx) if pos is None else _gather_reference(x, idx) + _gather_reference(pos, idx)
    return out.to(out_dtype)


@_gather_add_op.register_fake
def _(x, pos, idx, n_tokens, debug):
    M, B, K = idx.shape
    out_dtype = x.dtype if pos is None else torch.promote_types(x.dtype, pos.dtype)
    return x.new_empty((M * B, K, x.size(-1)), dtype=out_dtype)


@torch.library.custom_op("ijepa_fast::gather_add_backward", mutates_args=())
def _segment_sum_op(
    grad: torch.Tensor, idx: torch.Tensor, batch_dst: int, n_tokens: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """grad [M*B, K, D] scattered (summed) into [batch_dst, n_tokens, D] at the gathered rows."""
    if dsp.use_triton(grad.device):
        return _launch_segment_sum(grad, idx, batch_dst, n_tokens, out_dtype)
    return _segment_sum_reference(grad, idx, batch_dst, n_tokens, out_dtype)


@_segment_sum_op.register_fake
def _(grad, idx, batch_dst, n_tokens, out_dtype):
    return grad.new_empty((batch_dst, n_tokens, grad.size(-1)), dtype=out_dtype)


def scatter_rows(
    grad: torch.Tensor, idx: torch.Tensor, shape: torch.Size, n_tokens: int, dtype: torch.dtype
) -> torch.Tensor:
    """Gradient of a gathered operand of ``shape`` [1|B, 1|N, D] from grad [M*B, K, D]."""
    if shape[1] == 1 and n_tokens > 1:  # broadcast over tokens (the mask token): a plain sum
        M, B, K = idx.shape
        g = grad.reshape(M, B, K, -1).sum(dim=(0, 2), dtype=torch.float32)  # (B, D)
        if shape[0] == 1:
            g = g.sum(0, keepdim=True)
        return g.unsqueeze(1).to(dtype)  # (1|B, 1, D)
    return _segment_sum_op(grad, idx, shape[0], n_tokens, dtype)


class GatherAdd(torch.autograd.Function):
    """Autograd for the shared gather: gradients to x and, when it asks for one, to pos."""

    @staticmethod
    def forward(ctx, x, pos, idx, n_tokens, debug):
        ctx.save_for_backward(idx)
        ctx.n_tokens = n_tokens
        ctx.x_meta = (x.shape, x.dtype)
        ctx.pos_meta = None if pos is None else (pos.shape, pos.dtype)
        return _gather_add_op(x, pos, idx, n_tokens, debug)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        grad_x = grad_pos = None
        if ctx.needs_input_grad[0]:
            grad_x = scatter_rows(grad, idx, ctx.x_meta[0], ctx.n_tokens, ctx.x_meta[1])
        if ctx.pos_meta is not None and ctx.needs_input_grad[1]:
            grad_pos = scatter_rows(grad, idx, ctx.pos_meta[0], ctx.n_tokens, ctx.pos_meta[1])
        return grad_x, grad_pos, None, None, None


# ----------------------------------------------------------------------------- public API


def masked_gather(x: torch.Tensor, idx: torch.Tensor, *, debug: bool = False) -> torch.Tensor:
    """x [B, N, D], idx [B, K] or [M, B, K] (int64/int32) -> [M*B, K, D], ``out[m*B+b, k] = x[b, idx[m, b, k]]``."""
    dsp.check_tensor(x, "x", 3)
    idx = dsp.check_index(idx, "idx", x.size(0), x.device)
    return GatherAdd.apply(x, None, idx, x.size(1), debug)


def masked_gather_add(x: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor, *, debug: bool = False) -> torch.Tensor:
    """(x + pos) at the kept tokens: x [B, N, D], pos [1 or B, N, D], idx [B, K] or [M, B, K] -> [M*B, K, D].

    The result has torch's promoted dtype of x and pos (bf16 tokens + fp32 pos -> fp32, as ``x + pos``).
    """
    dsp.check_tensor(x, "x", 3)
    dsp.check_tensor(pos, "pos", 3)
    dsp.check_device(pos, "pos", x.device)
    if pos.size(0) not in (1, x.size(0)) or pos.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"pos must be [1 or {x.size(0)}, {x.size(1)}, {x.size(2)}] to match x {tuple(x.shape)}, "
            f"got {tuple(pos.shape)}"
        )
    idx = dsp.check_index(idx, "idx", x.size(0), x.device)
    return GatherAdd.apply(x, pos, idx, x.size(1), debug)


def mask_tokens(mask_token: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor, *, debug: bool = False) -> torch.Tensor:
    """mask_token [1, 1, D] + pos[b, idx]: pos [1 or B, N, D], idx [B, K] or [M, B, K] -> [M*B, K, D].

    The predictor's mask tokens for every target block; gradients go to mask_token (summed) and to
    pos when it requires one.
    """
    dsp.check_tensor(mask_token, "mask_token", 3)
    dsp.check_tensor(pos, "pos", 3)
    dsp.check_device(pos, "pos", mask_token.device)
    if mask_token.shape[:2] != (1, 1) or mask_token.size(2) != pos.size(2):
        raise ValueError(
            f"mask_token must be [1, 1, {pos.size(2)}] to match pos {tuple(pos.shape)}, got {tuple(mask_token.shape)}"
        )
    batch = idx.size(-2) if isinstance(idx, torch.Tensor) and idx.dim() >= 2 else -1
    idx = dsp.check_index(idx, "idx", batch, pos.device)
    if pos.size(0) not in (1, idx.size(1)):
        raise ValueError(f"pos has batch {pos.size(0)} but idx {tuple(idx.shape)} has batch {idx.size(1)}")
    return GatherAdd.apply(mask_token, pos, idx, pos.size(1), debug)
