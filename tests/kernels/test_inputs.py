"""The kernel inputs live in the package, so the kernel benchmarks run where pytest is not installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_benchmarks_import_without_pytest():
    code = "import sys; sys.modules['pytest'] = None; import profiling.bench_ema, profiling.bench_masked_gather"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
