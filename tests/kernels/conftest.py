"""Kernel tests run the Triton kernels through Triton's interpreter on the CPU, real kernels on a GPU.

Triton decorates its own library functions (tl.sum, ...) when it is first imported, in the mode
``TRITON_INTERPRET`` selects then, and interpreted and compiled kernels cannot mix in one process.
So on a machine without CUDA this file imports triton with ``TRITON_INTERPRET=1`` before anything
else does, and restores the environment; each kernel test then sets ``TRITON_INTERPRET=1`` for its
own duration (the kernels read it at call time), so the rest of the suite keeps the fast CPU path.
With CUDA, triton stays compiled: the interpreter tests skip and the ``gpu`` tests run on the device.
Ahead-of-time builds for NVIDIA GPUs (``aot_build``) run in a subprocess, where triton is imported compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ijepa_fast.runtime.optional import available


def _import_triton_interpreted() -> None:
    if torch.cuda.is_available() or "triton" in sys.modules:
        return
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        available("triton")  # imports (and caches) triton, in interpreter mode
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


_import_triton_interpreted()


def triton_interpreted() -> bool:
    """True when triton imported in interpreter mode, so kernels can run on the CPU here."""
    if not available("triton"):
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(sys.modules["triton.language.standard"].sum, InterpretedFunction)


@pytest.fixture(autouse=True)
def _triton_mode(request, monkeypatch):
    monkeypatch.delenv("IJEPA_FAST_DEBUG", raising=False)
    if request.node.get_closest_marker("gpu"):
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    elif triton_interpreted():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def triton_path():
    """Skip unless the kernels can run through the interpreter here; check that CPU calls take them."""
    if not triton_interpreted():
        pytest.skip("needs triton imported in interpreter mode (a machine without CUDA, triton installed)")
    from ijepa_fast.kernels import _dispatch

    assert _dispatch.use_triton(torch.device("cpu"))


@pytest.fixture
def reference_path(monkeypatch):
    """CPU calls take the plain-PyTorch reference (as outside the tests)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def aot_build(tmp_path: Path, *args: str) -> dict:
    """``python -m ijepa_fast.kernels.aot *args`` in a fresh Python where triton imports compiled:
    ahead-of-time builds of every kernel launch for NVIDIA GPUs, no GPU needed. Returns its JSON
    report (meta, rows); fails with its output when a build fails or a kernel spills."""
    if not available("triton"):
        pytest.skip("triton is not installed")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    report = tmp_path / "aot.json"
    cmd = [sys.executable, "-m", "ijepa_fast.kernels.aot", *args, "--json", str(report)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0 and "nvidia" in proc.stderr and "backend" in proc.stderr.lower():
        pytest.skip(f"triton cannot target NVIDIA here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return json.loads(report.read_text())


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place at |x| (x in float64): 2**(exponent - 7)."""
    _, exp = torch.frexp(x.abs().clamp_min(1e-30))
    return torch.ldexp(torch.ones_like(x), exp - 8)


def assert_lowp_close(
    out: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor, name: str, truncating: bool
) -> None:
    """out within 2x PyTorch's own low-precision error against a float64 reference.

    Bound per element: 2 * max|torch_lowp - ref64| (+ one bf16 ulp of ref64 when ``truncating``).
    Why the ulp: the interpreter rounds fp32 -> bf16 by truncation (up to 1 ulp) where GPUs and
    PyTorch round to nearest (half an ulp), so an element whose exact value sits near a rounding
    boundary can be off by a full ulp even though the fp32 math in the kernel is right.
    """
    out64, torch64 = out.double(), torch_lowp.double()
    torch_err = (torch64 - ref64).abs().max()
    bound = 2 * torch_err + (bf16_ulp(ref64) if truncating else 0.0)
    err = (out64 - ref64).abs()
    assert bool(torch.isfinite(out64).all()), f"{name}: non-finite values"
    assert bool((err <= bound).all()), (
        f"{name}: max error {err.max().item():.3g} beyond bound (torch's own bf16 error {torch_err.item():.3g})"
    )
