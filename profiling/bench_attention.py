"""Attention backends at I-JEPA's token counts: forward + backward time, TFLOP/s and memory.

    python -m profiling.bench_attention [--device cuda] [--batch 128] [--models vitb16 vith14 vith16_448]
                                        [--json out.json] [--record profiling/RESULTS.md]

Cases per model, with the mask sizes the real sampler gives at that grid (mean of two batches):
the target encoder's full sequence (B x N tokens), the context encoder's (B x Kc) and the
predictor's (M*B sequences of Kc + Kt tokens at width 384, the encoder's head count). Each case
times ``out = attn(q, k, v); out.backward(g)`` for q, k, v [seqs, heads, T, head_dim] in bf16, the
forward under bf16 autocast as the model runs it, every backend alike, on CUDA (fp32 without
autocast on a CPU), with ``triton.testing.do_bench`` (median and 20/80 percentiles) on CUDA, a
perf_counter loop on a CPU (``profiling/_bench_util.py``). Memory: peak allocated during one
forward + backward above what q, k, v and g hold. TFLOP/s counts the model's attention FLOPs
(4 T^2 head_dim per head forward, 2x that backward), not a kernel's recomputation.

Backends: ``math`` (the authors' explicit attention, op for op: under autocast its products run in
bf16 and its softmax in fp32, as theirs do), ``sdpa`` (PyTorch's own choice) and, on CUDA, SDPA
forced to one kernel (``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``) plus ``flash_attn``
(FlashAttention-2), ``flash_attn3`` (FlashAttention-3, Hopper) and ``xformers`` when installed. A
kernel that refuses a shape is reported as such.
On a CPU (default ``--batch 1``, ViT-B/16 and ViT-H/14 only) the run only shows the script works.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ijepa_fast.bench.paper import mean_mask_sizes
from ijepa_fast.bench.report import git_commit
from ijepa_fast.models.attention import attention_function, attention_math
from ijepa_fast.models.vit import vit_size
from ijepa_fast.runtime.device import autocast
from ijepa_fast.runtime.optional import available
from profiling import _bench_util as bu

# name -> (encoder preset, patch, image size)
MODELS = {"vitb16": ("vit_base", 16, 224), "vith14": ("vit_huge", 14, 224), "vith16_448": ("vit_huge", 16, 448)}
PRED_WIDTH = 384


def _sdpa_forced(backend, q, k, v):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v)


def backends(device: str) -> dict:
    fns = {"math": attention_math, "sdpa": F.scaled_dot_product_attention}
    if device == "cuda":
        from torch.nn.attention import SDPBackend

        forced = (
            ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
            ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
        )
        for name, kind in forced:
            fns[name] = functools.partial(_sdpa_forced, kind)
        for impl, package in (
            ("flash_attn", "flash_attn"),
            ("flash_attn3", "flash_attn_interface"),
            ("xformers", "xformers"),
        ):
            if available(package):
                fns[impl] = attention_function(impl)
    return fns


def cases(models: list[str], batch: int) -> list[dict]:
    """(label, seqs, heads, tokens, head_dim) of each model's three attention shapes."""
    out = []
    for key in models:
        name, patch, img = MODELS[key]
        size = vit_size(name)
        grid = img // patch
        m, kc, kt = mean_mask_sizes(grid, batch=max(batch, 16), batches=2)
        kc, kt = round(kc), round(kt)
        dh = size.embed_dim // size.num_heads
        out += [
            {
                "case": f"{key} target (N={grid * grid})",
                "seqs": batch,
                "heads": size.num_heads,
                "tokens": grid * grid,
                "head_dim": dh,
            },
            {"case": f"{key} context (Kc={kc})", "seqs": batch, "heads": size.num_heads, "tokens": kc, "head_dim": dh},
            {
                "case": f"{key} predictor ({m}x{batch} x {kc}+{kt})",
                "seqs": m * batch,
                "heads": size.num_heads,
                "tokens": kc + kt,
                "head_dim": PRED_WIDTH // size.num_heads,
            },
        ]
    return out


def measure(case: dict, method: str, fn, device: str, dtype: torch.dtype, reps: int) -> dict:
    """Time ``fn``'s forward and backward on random q, k, v in ``dtype``: the forward under autocast
    to ``dtype`` when it is a 16-bit type (as the model's blocks run), the backward outside (as the
    training step's)."""
    s, h, t, d = case["seqs"], case["heads"], case["tokens"], case["head_dim"]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(s, h, t, d, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    grad = torch.randn(s, h, t, d, device=device, dtype=dtype, generator=g)
    flops = 3 * 4.0 * s * h * t * t * d  # forward 4 T^2 d per head and sequence; backward 2x
    row = {**case, "method": method, "gflop": flops / 1e9}

    amp = dtype if dtype in (torch.bfloat16, torch.float16) else None

    def step():
        with autocast(torch.device(device), amp):
            out = fn(q, k, v)
        out.backward(grad)

    try:
        step()  # a kernel that refuses the shape fails here
        row.update(bu.time_ms(step, device, reps, grad_to_none=[q, k, v]))
        row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
        row["peak_mib"] = _peak_mib(step, device, [q, k, v])
        row["ok"] = True
    except (RuntimeError, ValueError) as exc:
        row.update(ok=False, error=" ".join(str(exc).split())[:160])
    finally:
        for x in (q, k, v):
            x.grad = None
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def _peak_mib(step, device: str, leaves: list[torch.Tensor]) -> float | None:
    if device != "cuda":
        return None
    for x in leaves:
        x.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def table(rows: list[dict]) -> str:
    lines = [
        "| case | seqs x heads x T x d | backend | fwd+bwd ms median (p20-p80) | TFLOP/s | x math | peak MiB |",
        "|" + "---|" * 7,
    ]
    math_ms = {r["case"]: r["median_ms"] for r in rows if r["method"] == "math" and r.get("ok")}
    for r in rows:
        shape = f"{r['seqs']} x {r['heads']} x {r['tokens']} x {r['head_dim']}"
        if not r.get("ok"):
            err = r["error"].replace("|", "/")
            lines.append(f"| {r['case']} | {shape} | {r['method']} | refused: {err} |  |  |  |")
            continue
        speedup = math_ms.get(r["case"], math.nan) / r["median_ms"]
        peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "n/a"
        lines.append(
            f"| {r['case']} | {shape} | {r['method']} | {r['median_ms']:.3f} ({r['p20_ms']:.3f}-"
            f"{r['p80_ms']:.3f}) | {r['tflops']:.1f} | {speedup:.2f} | {peak} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default 128 on CUDA, 1 on a CPU)")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None)
    p.add_argument("--backends", nargs="+", default=None, help="a subset of the backends (default: all available)")
    p.add_argument("--reps", type=int, default=5, help="CPU timing repeats (CUDA uses do_bench)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--record", nargs="?", const="profiling/RESULTS.md", default=None, metavar="PATH")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but CUDA is not available")
    cuda = args.device == "cuda"
    batch = args.batch or (128 if cuda else 1)
    models = args.models or (list(MODELS) if cuda else ["vitb16", "vith14"])
    dtype = torch.bfloat16 if cuda else torch.float32
    fns = backends(args.device)
    if args.backends:
        unknown = [b for b in args.backends if b not in fns]
        if unknown:
            p.error(f"--backends {unknown} not available here; available: {list(fns)}")
        fns = {k: fns[k] for k in args.backends}
    rows = [
        measure(c, name, fn, args.device, dtype, args.reps) for c in cases(models, batch) for name, fn in fns.items()
    ]
    typed = sys.argv[1:] if argv is None else argv
    meta = {
        "device": bu.device_name(args.device),
        "dtype": str(dtype).replace("torch.", ""),
        "batch": batch,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "command": " ".join(["python -m profiling.bench_attention", *(shlex.quote(a) for a in typed)]),
        "torch": torch.__version__,
    }
    for key, value in meta.items():
        print(f"- {key}: {value}")
    print()
    print(table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.record:
        with open(args.record, "a") as fh:
            fh.write(
                f"\n### attention fwd+bwd, batch {batch}, {meta['dtype']} · {meta['device']} · {meta['date']}\n\n"
                f"- commit: `{meta['commit']}`; command: `{meta['command']}`; torch {meta['torch']}\n\n"
                + table(rows)
                + "\n"
            )
    return rows


if __name__ == "__main__":
    main()
