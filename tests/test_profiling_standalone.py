"""The benchmarks in profiling/ stand on the package alone: they import nothing from tests/ (so
nothing that needs pytest), and run where pytest is not installed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROFILING = sorted((ROOT / "profiling").glob("*.py"))


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_profiling_imports_nothing_from_tests():
    assert PROFILING, "no module found in profiling/"
    imports = {
        p.name: sorted(m for m in _imported_modules(p) if m == "tests" or m.startswith("tests.")) for p in PROFILING
    }
    offenders = {name: modules for name, modules in imports.items() if modules}
    assert not offenders, f"profiling/ imports tests/ (move what they share into the package): {offenders}"


def test_benchmarks_import_without_pytest():
    modules = ", ".join(f"profiling.{p.stem}" for p in PROFILING)
    code = f"import sys; sys.modules['pytest'] = None; import {modules}"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
