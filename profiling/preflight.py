"""What a machine offers the GPU paths, checked before anything heavy runs (``make gpu-check``'s
first part; needs torch, nothing else).

Prints one line each: Python and torch; whether this torch has every torch attribute the package
names (``profiling/torch_api.py``: the GPU machines run an older torch than CI); the CUDA device,
its capability and SM count; bf16 support; free device memory (host memory without CUDA); the C
compiler and ``Python.h`` that Triton's first launch compiles its launcher with; one tiny Triton
launch (the package's EMA kernel on 4099 elements, checked against its reference); and which
optional packages import.

    python -m profiling.preflight [--facts FILE]

``--facts`` writes the findings as shell assignments (CUDA, DEVICE, TRITON, DALI) for
``profiling/gpu_check.sh`` to decide what runs. Exit status 1 when a check that a CUDA run needs
fails (no compiler, no Python.h, the Triton launch) or this torch lacks an attribute the package
names, else 0.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

from ijepa_fast.runtime import optional
from profiling import torch_api

GiB = 1024**3


def compiler() -> str | None:
    """The C compiler Triton builds its launcher with: $CC, else gcc, else clang (Triton's order)."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")


def python_header() -> Path | None:
    """``Python.h`` of this interpreter, where Triton looks for it; None when absent."""
    include = sysconfig.get_paths().get("include") or sysconfig.get_config_var("INCLUDEPY") or ""
    header = Path(include, "Python.h")
    return header if header.is_file() else None


def host_memory_available() -> int | None:
    """Bytes of host memory available (Linux ``MemAvailable``), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def triton_launch(device: torch.device) -> str:
    """Launch the EMA kernel once on ``device`` and compare with its reference: "ok (...)" or why not.
    (On the CPU the kernel runs only under ``TRITON_INTERPRET=1``, else its reference runs.)"""
    from ijepa_fast.kernels.ema import ema_update_, ema_update_reference

    g = torch.Generator(device="cpu").manual_seed(0)
    target, source = (torch.randn(4099, generator=g).to(device) for _ in range(2))  # odd size: a partial block
    expected = target.clone()
    ema_update_reference([expected], [source], 0.9)
    t0 = time.perf_counter()
    ema_update_([target], [source], 0.9)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    err = (target - expected).abs().max().item()
    if err > 1e-5:
        return f"failed: ran, but differs from the reference by {err:.2e}"
    return f"ok (compiled and ran in {seconds:.1f} s, matches the reference)"


def check(facts: dict[str, str]) -> list[tuple[str, str, bool]]:
    """(name, finding, ok) for each check; fills ``facts`` for gpu_check.sh."""
    rows = [("python", f"{platform.python_version()} ({sys.executable}), torch {torch.__version__}", True)]
    rows.append(_torch_api_row())
    cuda = torch.cuda.is_available()
    facts.update(CUDA="1" if cuda else "0", DEVICE="CPU (no CUDA)", TRITON="skipped: no CUDA")
    cc, header = compiler(), python_header()
    if cuda:
        dev = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(dev)
        facts["DEVICE"] = props.name
        rows.append(
            (
                "cuda",
                f"{props.name}, capability {props.major}.{props.minor} (sm_{props.major}{props.minor}), "
                f"{props.multi_processor_count} SMs, {torch.cuda.device_count()} device(s), CUDA {torch.version.cuda}",
                True,
            )
        )
        bf16 = torch.cuda.is_bf16_supported()
        rows.append(("bf16", "supported" if bf16 else "NOT supported (bf16 runs need Ampere or newer)", bf16))
        free, total = torch.cuda.mem_get_info(dev)
        rows.append(("memory", f"{free / GiB:.1f} GiB free of {total / GiB:.1f} GiB on the device", True))
    else:
        rows.append(("cuda", "none (torch.cuda.is_available() is False): the GPU parts are skipped", True))
        rows.append(("bf16", "skipped (no CUDA)", True))
        avail = host_memory_available()
        rows.append(("memory", f"no device; host {avail / GiB:.1f} GiB available" if avail else "no device", True))
    # Triton compiles a small C launcher on its first CUDA launch: a compiler and Python.h are needed.
    rows.append(
        ("compiler", cc or "NONE: Triton cannot build its launcher (install gcc, or set CC)", bool(cc) or not cuda)
    )
    rows.append(
        (
            "Python.h",
            str(header) if header else "NONE: Triton cannot build its launcher (install python3-dev)",
            bool(header) or not cuda,
        )
    )
    rows.append(_triton_row(cuda, facts))
    present = [f"{n} {_version(n)}".rstrip() for n in optional.known() if optional.available(n)]
    absent = [n for n in optional.known() if not optional.available(n)]
    facts["DALI"] = "1" if optional.available("dali") else "0"
    rows.append(("optional", f"present: {', '.join(present) or 'none'}; absent: {', '.join(absent) or 'none'}", True))
    return rows


def _torch_api_row() -> tuple[str, str, bool]:
    absent = torch_api.missing()
    if not absent:
        return "torch_api", "every torch attribute the package names is here", True
    named = "; ".join(f"{name} ({', '.join(sorted(files))})" for name, files in absent.items())
    return "torch_api", f"MISSING in torch {torch.__version__}: {named}", False


def _triton_row(cuda: bool, facts: dict[str, str]) -> tuple[str, str, bool]:
    if not cuda:
        return "triton", "launch skipped (no CUDA)", True
    if not optional.available("triton"):
        facts["TRITON"] = "failed: triton is not installed"
        return "triton", "NOT installed: the fused kernels fall back to PyTorch", False
    try:
        finding = triton_launch(torch.device("cuda", torch.cuda.current_device()))
    except Exception as err:  # the launch failing is the finding: name it, in one line
        lines = str(err).strip().splitlines()
        finding = f"failed: {type(err).__name__}: {lines[-1] if lines else ''}"
    facts["TRITON"] = finding
    return "triton", f"launch {finding}", finding.startswith("ok")


def _version(name: str) -> str:
    return str(getattr(optional.require(name, "the preflight"), "__version__", ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--facts", type=Path, default=None, help="write the findings as shell assignments here")
    args = p.parse_args(argv)
    facts: dict[str, str] = {}
    rows = check(facts)
    print("preflight:")
    for name, finding, ok in rows:
        print(f"  {name:<9} {finding}{'' if ok else '   <-- FAILS'}")
    if args.facts:
        args.facts.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in facts.items()))
    return 0 if all(ok for _, _, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
