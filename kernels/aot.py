"""Ahead-of-time builds of every kernel launch the training step and the engines make, for NVIDIA
GPUs, on a machine without one: Triton's compiler and ptxas ship in its wheel.

Each launch is captured from the real call path (the public op, forward and backward, with
``_dispatch.launch`` swapped for a recorder) on CPU tensors of the shapes, dtypes and layouts the
step passes; memory is allocated but never touched. Triton's own binder then derives what a GPU run
specialises on (the dtypes, pointers aligned to 16 bytes, integers divisible by 16, integers equal
to 1 as constants), and ``triton.compile`` builds that variant for the target. ptxas's report gives
registers and spills, Triton's metadata the shared memory, the PTX the widest global load, and
per pointer argument the widest load from it (each load's address traced back through the PTX to
the pointer it offsets).

    python -m ijepa_fast.kernels.aot                          # every launch for sm_90 and sm_80
    python -m ijepa_fast.kernels.aot --arch sm_90 --shapes vith14 --json out.json
    python -m ijepa_fast.kernels.aot --contrast               # also the layouts the step avoids

Run it where triton imports compiled (``TRITON_INTERPRET`` unset). Exits non-zero when a kernel spills.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

from ijepa_fast.kernels import _dispatch as dsp
from ijepa_fast.kernels import ema
from ijepa_fast.kernels.inputs import GATHER_SHAPES, VIT_PARAM_SIZES, vit_param_shapes
from ijepa_fast.kernels.masked_gather import mask_tokens, masked_gather, masked_gather_add
from ijepa_fast.kernels.target_norm_gather import target_norm_gather

ARCHS = {"sm_90": 90, "sm_80": 80}  # Hopper (H100, H200) and Ampere (A100)
SHAPE_SETS = ("vith14", "odd")
F32, BF16 = torch.float32, torch.bfloat16


@dataclass
class Launch:
    """One captured ``dsp.launch``: the jitted kernel and exactly the arguments a GPU run would pass."""

    case: str
    kernel: object
    args: tuple
    constexprs: dict


@dataclass
class Build:
    """One compiled variant: which launches it serves and what the compiler reports for it."""

    kernel: str
    arch: str
    cases: list[str]
    signature: str
    constexprs: str
    divisible_by_16: str  # the arguments specialised as divisible by 16 (pointers: 16-byte aligned)
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    num_warps: int
    widest_load: str  # "v4", "v2" or "scalar": the widest ld.global in the PTX
    load_bits: dict = field(default_factory=dict)  # pointer argument -> bits of its widest load per thread
    ptx: str = field(default="", repr=False)

    def row(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "ptx"}


# ----------------------------------------------------------------------------- the launches


def _empty(*shape: int, dtype=F32, grad: bool = False) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype).requires_grad_(grad)


def _patch_tokens(B: int, N: int, D: int, dtype) -> torch.Tensor:
    """[B, N, D] laid out as PatchEmbed returns it: contiguous (its convolution runs channels-last;
    tests/kernels/test_aot.py checks the two agree)."""
    return _empty(B, N, D, dtype=dtype, grad=True)


def _transposed_tokens(B: int, N: int, D: int, dtype) -> torch.Tensor:
    """[B, N, D] as the convolution gives it on images in their own layout: a transposed view of
    [B, D, N] (strides N*D, 1, N), features N elements apart."""
    return _empty(B, D, N, dtype=dtype, grad=True).transpose(1, 2)


def _idx(M: int, B: int, K: int, N: int) -> torch.Tensor:
    return (torch.arange(K) * 7 % N).expand(M, B, K).contiguous()  # any valid indices: only shapes matter


def _backward(out: torch.Tensor) -> None:
    out.backward(torch.empty_like(out))


def _context_gather(s: dict, x_dtype, pos_dtype, tokens=_patch_tokens) -> None:
    """The encoder's input: PatchEmbed tokens + pos at the context tokens, and the gradient to the tokens."""
    x = tokens(s["B"], s["N"], s["D"], x_dtype)
    _backward(masked_gather_add(x, _empty(1, s["N"], s["D"], dtype=pos_dtype), _idx(1, s["B"], s["K_ctx"], s["N"])))


def _predictor_pos(s: dict, dtype) -> None:
    """The predictor's position embedding at the context tokens (a fixed buffer: no gradient)."""
    pos = _empty(1, s["N"], s["D_pred"], dtype=dtype).expand(s["B"], -1, -1)
    masked_gather(pos, _idx(1, s["B"], s["K_ctx"], s["N"]))


def _mask_tokens(s: dict, dtype) -> None:
    """The predictor's mask tokens + pos for every target block (the mask token's gradient is a sum)."""
    token = _empty(1, 1, s["D_pred"], dtype=dtype, grad=True)
    pos = _empty(1, s["N"], s["D_pred"], dtype=dtype)
    _backward(mask_tokens(token, pos, _idx(s["M"], s["B"], s["K"], s["N"])))


def _targets(s: dict, dtype) -> None:
    """LayerNorm of the target encoder's output at the target tokens, forward and backward."""
    h = _empty(s["B"], s["N"], s["D"], dtype=dtype, grad=True)
    _backward(target_norm_gather(h, _idx(s["M"], s["B"], s["K"], s["N"])))


def _ema_tensors(shape_set: str, dtype) -> list[torch.Tensor]:
    if shape_set == "vith14":  # one tensor per parameter, as the plain engine and ZeRO 0-2 pass them
        return [_empty(*shape, dtype=dtype) for shape in vit_param_shapes(**VIT_PARAM_SIZES["vith14"])]
    flat = _empty(1000, dtype=dtype)  # ZeRO-3 style partitions: views at odd offsets, so not aligned
    return [flat[1:38], flat[38:41], flat[41:1000]]


def _ema(shape_set: str, t_dtype, s_dtype, bf16_out: bool) -> None:
    targets, sources = _ema_tensors(shape_set, t_dtype), _ema_tensors(shape_set, s_dtype)
    ema.ema_update_(targets, sources, 0.996, _ema_tensors(shape_set, BF16) if bf16_out else None)


def cases(shape_set: str) -> dict[str, Callable[[], None]]:
    """label -> a call that makes the launches of that use, at the shapes of ``shape_set``.

    Dtypes: bf16 autocast (the default on CUDA) gives bf16 tokens with fp32 buffers and fp32
    targets (LayerNorm runs in fp32 under autocast); fp32 runs give fp32 everywhere; DeepSpeed's
    bf16 mode (ZeRO 1-3) gives bf16 weights, hence bf16 tokens and buffers, and an fp32 target
    encoder updated from bf16 sources.
    """
    s = GATHER_SHAPES[shape_set]
    return {
        "context gather+pos bf16 tokens, fp32 pos": lambda: _context_gather(s, BF16, F32),
        "context gather+pos fp32": lambda: _context_gather(s, F32, F32),
        "context gather+pos bf16 weights": lambda: _context_gather(s, BF16, BF16),
        "predictor pos gather fp32": lambda: _predictor_pos(s, F32),
        "predictor pos gather bf16": lambda: _predictor_pos(s, BF16),
        "mask tokens fp32": lambda: _mask_tokens(s, F32),
        "mask tokens bf16": lambda: _mask_tokens(s, BF16),
        "target norm-gather fp32": lambda: _targets(s, F32),
        "target norm-gather bf16": lambda: _targets(s, BF16),
        "ema fp32 <- fp32": lambda: _ema(shape_set, F32, F32, False),
        "ema fp32 <- bf16": lambda: _ema(shape_set, F32, BF16, False),
        "ema fp32 <- fp32, bf16 copy": lambda: _ema(shape_set, F32, F32, True),
        "ema bf16 <- bf16": lambda: _ema(shape_set, BF16, BF16, False),
    }


def contrast_cases(shape_set: str) -> dict[str, Callable[[], None]]:
    """label -> a launch the step does not make, built beside its own for comparison."""
    s = GATHER_SHAPES[shape_set]
    return {
        "context gather+pos bf16 tokens transposed, fp32 pos": lambda: _context_gather(
            s, BF16, F32, _transposed_tokens
        ),
    }


@contextlib.contextmanager
def _recording(launches: list[Launch], case: list[str]) -> Iterator[None]:
    """Ops take their Triton path on the CPU, and every launch is recorded instead of run."""

    def record(kernel, grid, device, *args, **constexprs):
        launches.append(Launch(case[0], kernel, args, constexprs))

    with mock.patch.object(dsp, "use_triton", lambda device: True), mock.patch.object(dsp, "launch", record):
        yield


def capture(shape_sets: tuple[str, ...] = SHAPE_SETS, contrast: bool = False) -> list[Launch]:
    """Every launch of every case (and of the contrast cases), in order; labels are prefixed with
    the shape set."""
    if dsp.interpret_mode():
        raise RuntimeError("TRITON_INTERPRET=1 is set: the ahead-of-time build needs triton in compiled mode")
    launches: list[Launch] = []
    current = [""]
    with _recording(launches, current):
        for shape_set in shape_sets:
            extra = contrast_cases(shape_set) if contrast else {}
            for label, run in {**cases(shape_set), **extra}.items():
                current[0] = f"{shape_set}: {label}"
                run()
    return launches


# ----------------------------------------------------------------------------- the builds


def _specialise(launch: Launch, backend):
    """(options, signature, constexprs, attrs) exactly as ``JITFunction.run`` derives them on a GPU."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    kwargs = {
        **launch.constexprs,
        "debug": fn.debug or knobs.runtime.debug,
        "instrumentation_mode": knobs.compilation.instrumentation_mode,
    }
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


def _ptxas_report(log: str, name: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ptxas's -v report."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas resource report for {name}; ptxas said:\n{log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def _widest_load(ptx: str) -> str:
    widths = {int(w) for w in re.findall(r"ld\.global(?:\.[a-z0-9]+)*?\.v(\d)\.", ptx)}
    return f"v{max(widths)}" if widths else "scalar"


_INSTRUCTION = re.compile(r"^(?:@!?%\w+\s+)?([a-z][\w.:]*)\s+(.*?);?$")


def _load_bits(ptx: str, pointer_params: dict[int, str]) -> dict[str, int]:
    """{pointer argument: bits of the widest global load from it, per thread and instruction}.

    A register holds an address derived from the pointer parameters its computation reads
    (``ld.param`` of the pointer, then any arithmetic on it); a loaded value derives from none, so
    indices loaded from memory do not tie an address to the index array."""
    origin: dict[str, frozenset[int]] = {}
    widest: dict[str, int] = {}
    for raw in ptx.splitlines():
        m = _INSTRUCTION.match(raw.strip())
        if m is None:
            continue
        op, args = m.groups()
        regs = re.findall(r"%\w+", args)
        if op.startswith("ld.param"):
            param = re.search(r"_param_(\d+)\]", args)
            if regs and param and int(param.group(1)) in pointer_params:
                origin[regs[0]] = frozenset([int(param.group(1))])
        elif op.startswith("ld.global"):
            address = re.search(r"\[\s*(%\w+)", args)
            vector = re.search(r"\.v(\d)\.", op)
            element = re.search(r"\.[bfsu](\d+)$", op)
            if address and element:
                bits = int(vector.group(1) if vector else 1) * int(element.group(1))
                for k in origin.get(address.group(1), ()):
                    name = pointer_params[k]
                    widest[name] = max(widest.get(name, 0), bits)
        elif regs and not op.startswith(("st.", "ld.", "bra", "ret", "setp", "@")):
            dests = re.findall(r"%\w+", args.split("}", 1)[0]) if args.startswith("{") else regs[:1]
            sources = regs[len(dests) :]
            derived = frozenset().union(*(origin.get(r, frozenset()) for r in sources))
            for d in dests:
                origin[d] = derived
    return widest


@contextlib.contextmanager
def _fresh_cache_with_ptxas_report() -> Iterator[None]:
    """Compile into an empty cache (a cached kernel skips ptxas, hence its report), and let ptxas's
    report (it always runs with -v) reach stdout."""
    from triton import knobs

    with tempfile.TemporaryDirectory(prefix="ijepa_aot_") as cache, knobs.cache.scope(), knobs.nvidia.scope():
        knobs.cache.dir = cache
        knobs.nvidia.dump_ptxas_log = True
        yield


def _compile(launch: Launch, spec: tuple, target, arch: str) -> Build:
    import triton
    from triton.compiler import ASTSource

    options, signature, constexprs, attrs = spec
    name, names = launch.kernel.fn.__name__, launch.kernel.arg_names
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        src = ASTSource(launch.kernel, signature, constexprs, attrs)
        compiled = triton.compile(src, target=target, options=options.__dict__)
    regs, spill_stores, spill_loads = _ptxas_report(log.getvalue(), name)
    # PTX parameters: the arguments that are not constants, in order.
    params = [k for k, v in signature.items() if v != "constexpr"]
    pointers = {i: k for i, k in enumerate(params) if str(signature[k]).startswith("*")}
    return Build(
        kernel=name,
        arch=arch,
        cases=[launch.case],
        signature=", ".join(f"{k}:{v}" for k, v in signature.items() if v != "constexpr"),
        constexprs=", ".join(f"{names[k[0]]}={v}" for k, v in constexprs.items()),
        divisible_by_16=", ".join(names[k[0]] for k, v in attrs.items() if ["tt.divisibility", 16] in v),
        registers=regs,
        spill_stores=spill_stores,
        spill_loads=spill_loads,
        shared_bytes=compiled.metadata.shared,
        num_warps=compiled.metadata.num_warps,
        widest_load=_widest_load(compiled.asm["ptx"]),
        load_bits=_load_bits(compiled.asm["ptx"], pointers),
        ptx=compiled.asm["ptx"],
    )


def build(launches: list[Launch], arch: str) -> list[Build]:
    """Compile each distinct variant among ``launches`` once for ``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", ARCHS[arch], 32)
    backend = make_backend(target)
    builds: dict[str, Build] = {}
    with _fresh_cache_with_ptxas_report():
        for launch in launches:
            spec = _specialise(launch, backend)
            key = repr((launch.kernel.fn.__name__, *spec[1:]))  # kernel, signature, constexprs, attrs
            if key in builds:
                builds[key].cases.append(launch.case)
            else:
                builds[key] = _compile(launch, spec, target, arch)
    return list(builds.values())


# ----------------------------------------------------------------------------- report


def markdown(builds: list[Build]) -> str:
    head = "| arch | kernel | launches | constexprs | divisible by 16 | regs | spill st/ld B | smem B | warps "
    lines = [head + "| widest load | load bits per operand |", "|" + "---|" * 11]
    for b in builds:
        per_operand = ", ".join(f"{k} {v}" for k, v in b.load_bits.items())
        lines.append(
            f"| {b.arch} | {b.kernel} | {'; '.join(b.cases)} | {b.constexprs} | {b.divisible_by_16} | {b.registers} "
            f"| {b.spill_stores}/{b.spill_loads} | {b.shared_bytes} | {b.num_warps} | {b.widest_load} | {per_operand} |"
        )
    return "\n".join(lines)


def meta() -> dict:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version

    ptxas = get_ptxas_version().strip().splitlines()[-1]
    return {"triton": triton.__version__, "torch": torch.__version__, "ptxas": ptxas}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Compile every kernel launch for NVIDIA GPUs ahead of time (no GPU).")
    p.add_argument("--arch", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    p.add_argument("--shapes", nargs="+", choices=SHAPE_SETS, default=list(SHAPE_SETS))
    p.add_argument("--json", type=Path, default=None, help="also write the rows (and versions) to this JSON file")
    p.add_argument("--contrast", action="store_true", help="also build the layouts the step avoids, for comparison")
    args = p.parse_args(argv)
    launches = capture(tuple(args.shapes), args.contrast)
    builds = [b for arch in args.arch for b in build(launches, arch)]
    info = meta()
    print("- " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(markdown(builds))
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": info, "rows": [b.row() for b in builds]}, indent=2))
    spilled = [f"{b.kernel} ({b.arch}: {'; '.join(b.cases)})" for b in builds if b.spill_stores or b.spill_loads]
    if spilled:
        print(f"error: registers spill in {', '.join(spilled)}: shrink its block sizes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
