"""Fused EMA update of the target encoder: ``t = m * t + (1 - m) * s`` over every parameter at once.

One launch per (target dtype, source dtype, bf16 copy or not) group, normally one in all (two with a
copy of only some tensors: the target encoder's matmul weights, ``speed.bf16_target_copy``). Each
program owns one chunk of one tensor; a small int64 table (built on the host once per set of
tensors and cached) gives every program its tensor's addresses, length and chunk start, so tensors
of any sizes, ordinary parameters or flat 1-D buffers (DeepSpeed ZeRO partitions), go in one launch.
Bytes moved are the minimum: read t, read s, write t (and write the bf16 copy when asked for).

Math is fp32 whatever the storage (fp32 or bf16 targets, fp32 or bf16 sources). Momentum is read
from a device tensor inside the kernel, so a new value each step neither recompiles nor syncs.
``m + (1 - m)`` is exactly 1 in fp32 for m in [0.5, 1], so the update has no drift in scale.

``apply``, a 0-d bool device tensor, is read inside the kernel too: where it is false (a training
step whose loss or gradients were not finite) every program returns without reading or writing, so
the targets keep their bits and the host never learns the flag's value.
"""

from __future__ import annotations

import torch

from ijepa_fast.kernels import _dispatch as dsp

# Elements per load (BLOCK) and loads per program (ITERS): a chunk of 8192 elements per program,
# 77k programs for ViT-H/14's 631M parameters. Common defaults for a memory-bound stream, not yet
# tuned on a GPU. Tests shrink them to cover chunk edges.
_BLOCK = 1024
_ITERS = 8
_TARGET_DTYPES = (torch.float32, torch.bfloat16)
_TABLE_CACHE: dict[tuple, tuple[torch.Tensor, int, bool]] = {}
_TABLE_CACHE_MAX = 16


@dsp.lazy_jit
def _kernel():
    """The EMA kernel."""
    triton = dsp.triton_module()
    tl = triton.language

    @triton.jit
    def ema_kernel(
        t_ptrs,
        s_ptrs,
        o_ptrs,
        numels,
        chunk_tensor,
        chunk_start,
        t0,
        s0,
        o0,
        m_ptr,
        apply_ptr,
        HAS_OUT: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
        ITERS: tl.constexpr,
    ):
        # t0, s0, o0 are the group's first tensors: only their pointer types are used, to give the
        # addresses read from the table their element types.
        c = tl.program_id(0)
        j = tl.load(chunk_tensor + c)
        start = tl.multiple_of(tl.load(chunk_start + c), BLOCK)  # chunk starts are multiples of BLOCK
        n = tl.load(numels + j)
        t = tl.load(t_ptrs + j).to(t0.dtype)
        s = tl.load(s_ptrs + j).to(s0.dtype)
        o = tl.load(o_ptrs + j).to(o0.dtype)
        if ALIGNED:  # every address 16-byte aligned (checked on the host): lets loads be 128-bit
            t = tl.multiple_of(t, 16)
            s = tl.multiple_of(s, 16)
            o = tl.multiple_of(o, 16)
        m = tl.load(m_ptr).to(tl.float32)
        w = 1.0 - m
        # One uniform branch per program: a skipped update moves no bytes, an applied one runs the
        # same unmasked loads and stores as without the flag.
        if tl.load(apply_ptr) != 0:
            for it in tl.static_range(ITERS):
                offs = start + it * BLOCK + tl.arange(0, BLOCK)
                # Full blocks go unmasked: a mask built from a loaded length defeats vectorisation.
                if start + (it + 1) * BLOCK <= n:
                    new = m * tl.load(t + offs).to(tl.float32) + w * tl.load(s + offs).to(tl.float32)
                    tl.store(t + offs, new.to(t0.dtype.element_ty))
                    if HAS_OUT:
                        tl.store(o + offs, new.to(o0.dtype.element_ty))
                else:
                    mask = offs < n
                    new = m * tl.load(t + offs, mask=mask, other=0.0).to(tl.float32) + w * tl.load(
                        s + offs, mask=mask, other=0.0
                    ).to(tl.float32)
                    tl.store(t + offs, new.to(t0.dtype.element_ty), mask=mask)
                    if HAS_OUT:
                        tl.store(o + offs, new.to(o0.dtype.element_ty), mask=mask)

    return ema_kernel


# ----------------------------------------------------------------------------- launcher


def _table(ts: list[torch.Tensor], ss: list[torch.Tensor], os_: list[torch.Tensor], chunk: int) -> tuple:
    """(table, n_chunks, aligned) for one group; the table is int64, on the tensors' device:
    [t_ptrs | s_ptrs | o_ptrs | numels | chunk_tensor | chunk_start].

    Built once per set of addresses and cached: everything in it follows from the key.
    """
    ptrs = [(t.data_ptr(), s.data_ptr(), o.data_ptr(), t.numel()) for t, s, o in zip(ts, ss, os_)]
    key = (ts[0].device, chunk, tuple(ptrs))
    entry = _TABLE_CACHE.get(key)
    if entry is None:
        chunk_tensor = [j for j, p in enumerate(ptrs) for _ in range(0, p[3], chunk)]
        chunk_start = [c for p in ptrs for c in range(0, p[3], chunk)]
        columns = [v for col in zip(*ptrs) for v in col]  # t_ptrs, s_ptrs, o_ptrs, numels
        table = torch.tensor(columns + chunk_tensor + chunk_start, dtype=torch.int64).to(ts[0].device)
        aligned = all(p % 16 == 0 for row in ptrs for p in row[:3])
        if len(_TABLE_CACHE) >= _TABLE_CACHE_MAX:
            _TABLE_CACHE.clear()
        entry = _TABLE_CACHE[key] = (table, len(chunk_start), aligned)
    return entry


def _launch_group(
    ts: list[torch.Tensor],
    ss: list[torch.Tensor],
    os_: list[torch.Tensor] | None,
    m: torch.Tensor,
    apply: torch.Tensor,
) -> None:
    """One launch over tensors of one (t dtype, s dtype) kind; all contiguous and non-empty."""
    has_out = os_ is not None
    os_ = os_ if has_out else ts  # unused addresses; the kernel never stores there without HAS_OUT
    table, n_chunks, aligned = _table(ts, ss, os_, _BLOCK * _ITERS)
    n = len(ts)
    views = [table[i * n : (i + 1) * n] for i in range(4)]  # t_ptrs, s_ptrs, o_ptrs, numels
    views += [table[4 * n : 4 * n + n_chunks], table[4 * n + n_chunks :]]  # chunk_tensor, chunk_start
    dsp.launch(
        _kernel(),
        (n_chunks,),
        ts[0].device,
        *views,
        ts[0],
        ss[0],
        os_[0],
        m,
        apply,
        HAS_OUT=has_out,
        ALIGNED=aligned,
        BLOCK=_BLOCK,
        ITERS=_ITERS,
    )


def _update_one(
    t: torch.Tensor, s: torch.Tensor, m: torch.Tensor, o: torch.Tensor | None, apply: torch.Tensor | None = None
) -> None:
    """One pair in fp32 math with torch ops (non-contiguous tensors, and the CPU path). Where
    ``apply`` (0-d bool tensor) is false, ``t`` and ``o`` keep their bits (a select, no host read)."""
    if apply is not None:  # out of place (t.float() is t itself for fp32), then selected in t's dtype
        new = t.float().mul(m).add_(s.float() * (1.0 - m))
        t.copy_(torch.where(apply, new.to(t.dtype), t))
        if o is not None:
            o.copy_(torch.where(apply, new.to(o.dtype), o))
        return
    if t.dtype == torch.float32:
        t.mul_(m).add_(s.float() * (1.0 - m))
        new = t
    else:
        new = t.float().mul_(m).add_(s.float() * (1.0 - m))
        t.copy_(new)
    if o is not None:
        o.copy_(new)


def _launch(
    targets: list[torch.Tensor],
    sources: list[torch.Tensor],
    m: torch.Tensor,
    bf16_out: list[torch.Tensor | None] | None,
    apply: torch.Tensor,
) -> None:
    """Group the pairs by dtypes and by whether they have a bf16 copy, and launch once per group;
    odd (non-contiguous) tensors take torch ops."""
    groups: dict[tuple, list[int]] = {}
    for i, (t, s) in enumerate(zip(targets, sources)):
        o = None if bf16_out is None else bf16_out[i]
        if t.numel() == 0:
            continue
        if not (t.is_contiguous() and s.is_contiguous() and (o is None or o.is_contiguous())):
            _update_one(t, s, m, o, apply)
            continue
        groups.setdefault((t.dtype, s.dtype, o is not None), []).append(i)
    for (_, _, has_out), members in groups.items():
        _launch_group(
            [targets[i] for i in members],
            [sources[i] for i in members],
            [bf16_out[i] for i in members] if has_out else None,
            m,
            apply,
        )


# ----------------------------------------------------------------------------- references


def ema_update_reference(
    targets: list[torch.Tensor],
    sources: list[torch.Tensor],
    momentum: float | torch.Tensor,
    bf16_out: list[torch.Tensor | None] | None = None,
    apply: torch.Tensor | None = None,
) -> None:
    """The authors' loop: one ``mul_`` and one ``add_`` per parameter (fp32 math for bf16 targets).
    With ``apply`` (0-d bool tensor), a select after each update keeps the old bits where it is false."""
    with torch.no_grad():
        for i, (t, s) in enumerate(zip(targets, sources)):
            _update_one(t, s, momentum, None if bf16_out is None else bf16_out[i], apply)


def ema_update_foreach(
    targets: list[torch.Tensor],
    sources: list[torch.Tensor],
    momentum: float,
    bf16_out: list[torch.Tensor] | None = None,
) -> None:
    """The best built-in: ``torch._foreach_lerp_(t, s, 1 - m)`` (same-dtype lists), then a foreach copy."""
    with torch.no_grad():
        torch._foreach_lerp_(targets, sources, 1.0 - float(momentum))
        if bf16_out is not None:
            torch._foreach_copy_(bf16_out, targets)


# ----------------------------------------------------------------------------- custom op and API


def _ema_impl(
    targets: list[torch.Tensor],
    sources: list[torch.Tensor],
    momentum: torch.Tensor,
    bf16_out: list[torch.Tensor],
    apply: torch.Tensor,
) -> None:
    outs = bf16_out if bf16_out else None
    if dsp.use_triton(targets[0].device):
        _launch(targets, sources, momentum, outs, apply)
    else:
        ema_update_reference(targets, sources, momentum, outs, apply)


@torch.library.custom_op("ijepa_fast::ema_update_", mutates_args=("targets", "bf16_out"))
def _ema_op(
    targets: list[torch.Tensor],
    sources: list[torch.Tensor],
    momentum: torch.Tensor,
    bf16_out: list[torch.Tensor],
    apply: torch.Tensor,
) -> None:
    """In place, where ``apply``: targets <- m * targets + (1 - m) * sources; bf16_out (empty list:
    none) <- targets."""
    _ema_impl(targets, sources, momentum, bf16_out, apply)


@_ema_op.register_fake
def _(targets, sources, momentum, bf16_out, apply):
    return None


def _check_lists(targets: list, sources: list, bf16_out: list | None) -> torch.device:
    if len(targets) != len(sources):
        raise ValueError(f"targets has {len(targets)} tensors but sources has {len(sources)}")
    if bf16_out is not None and len(bf16_out) != len(targets):
        raise ValueError(f"bf16_out has {len(bf16_out)} tensors but targets has {len(targets)}")
    device = targets[0].device
    for i, (t, s) in enumerate(zip(targets, sources)):
        if t.dtype not in _TARGET_DTYPES:
            raise TypeError(f"targets[{i}] must be float32 or bfloat16, got {t.dtype}")
        if not s.is_floating_point():
            raise TypeError(f"sources[{i}] must be floating point, got {s.dtype}")
        if t.shape != s.shape:
            raise ValueError(f"targets[{i}] has shape {tuple(t.shape)} but sources[{i}] has {tuple(s.shape)}")
        dsp.check_device(t, f"targets[{i}]", device)
        dsp.check_device(s, f"sources[{i}]", device)
        o = None if bf16_out is None else bf16_out[i]
        if o is not None:
            if o.dtype != torch.bfloat16 or o.shape != t.shape:
                raise ValueError(
                    f"bf16_out[{i}] must be bfloat16 of shape {tuple(t.shape)}, got {o.dtype} {tuple(o.shape)}"
                )
            dsp.check_device(o, f"bf16_out[{i}]", device)
    return device


def _apply_tensor(apply: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """0-d bool tensor on ``device`` (None: always apply); a device tensor is used as it is, unread."""
    if apply is None:
        return torch.ones((), dtype=torch.bool, device=device)
    if apply.numel() != 1 or apply.dtype != torch.bool:
        raise ValueError(f"apply must be a one-element bool tensor, got {apply.dtype} of shape {tuple(apply.shape)}")
    return apply.reshape(()).to(device)


def _momentum_tensor(momentum: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """0-d fp32 tensor on ``device``; torch.full fills on the device, so a float costs no host sync."""
    if isinstance(momentum, torch.Tensor):
        if momentum.numel() != 1:
            raise ValueError(f"momentum must be a float or a one-element tensor, got shape {tuple(momentum.shape)}")
        return momentum.reshape(()).to(device=device, dtype=torch.float32)
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    return torch.full((), momentum, dtype=torch.float32, device=device)


def ema_update_(
    targets: list[torch.Tensor],
    sources: list[torch.Tensor],
    momentum: float | torch.Tensor,
    bf16_out: list[torch.Tensor | None] | None = None,
    apply: torch.Tensor | None = None,
) -> None:
    """In place ``t = m * t + (1 - m) * s`` for every pair, fp32 math; optionally ``bf16_out[i] = t`` (bf16;
    a None entry: that target has no copy).

    targets: fp32 or bf16 tensors (parameters, or flat 1-D buffers); sources: same shapes, any float
    dtype; momentum: Python float or one-element tensor (a device tensor avoids any host work);
    apply: one-element bool tensor (None: true); where false, targets and bf16_out keep their bits,
    decided on the device.
    """
    targets, sources = list(targets), list(sources)
    bf16_out = None if bf16_out is None else list(bf16_out)
    if not targets and not sources:
        return
    device = _check_lists(targets, sources, bf16_out)
    m = _momentum_tensor(momentum, device)
    flag = _apply_tensor(apply, device)
    with torch.no_grad():  # parameters that require grad may then be updated in place
        if torch.compiler.is_compiling():  # opaque to the tracer, with its fake; its lists hold no None
            for ts, ss, outs in _split_by_copy(targets, sources, bf16_out):
                _ema_op(ts, ss, m, outs, flag)
        else:
            # Eager: skip the op dispatcher, whose per-tensor work over 3 lists of ~400 tensors costs
            # as much as the update itself for a small model.
            _ema_impl(targets, sources, m, [] if bf16_out is None else bf16_out, flag)


def _split_by_copy(targets: list, sources: list, bf16_out: list | None) -> list[tuple[list, list, list]]:
    """(targets, sources, bf16 copies) with a copy for each, then those without (copies: [])."""
    if bf16_out is None:
        return [(targets, sources, [])]
    with_copy = [i for i, o in enumerate(bf16_out) if o is not None]
    without = [i for i, o in enumerate(bf16_out) if o is None]
    parts = [([targets[i] for i in with_copy], [sources[i] for i in with_copy], [bf16_out[i] for i in with_copy])]
    parts.append(([targets[i] for i in without], [sources[i] for i in without], []))
    return [part for part in parts if part[0]]
