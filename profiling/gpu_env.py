"""A Python for ``make gpu-check`` that imports the whole package, built offline.

``ijepa_fast.kernels`` lives in the top-level ``kernels/`` folder and exists only once the package
is installed, so a bare Python run from the repository root imports ``ijepa_fast`` without its
kernels. Given such a Python (the GPU machines' ``python3``: torch, triton, numpy and nothing of
ours), this builds a throwaway virtualenv over it: its own site-packages first, then the given
Python's (so torch and friends are that Python's own, nothing is copied), with the wheels carried
in ``.whl/`` (``make gpu-wheels``) and the package installed editable, all without network or
dependency resolution. A Python that already imports the package, with no wheels to add, is used
as it is.

    python -m profiling.gpu_env [--env DIR] [--wheels DIR]

prints the path of the Python to use on its last line; on failure, one line naming what is
missing and how to get it, and exit status 1. Standard library only.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ENV = Path("/tmp/ijepa-gpu-check-env")


class EnvError(RuntimeError):
    """The environment cannot be built; the message says what to do."""


def _run(python: Path | str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], cwd=REPO, capture_output=True, text=True)


def imports_package(python: Path | str) -> bool:
    """Whether ``python``, run from the repository root, imports the package with its kernels."""
    return _run(python, "-c", "import ijepa_fast.kernels").returncode == 0


def _site_dirs(python: Path | str) -> list[str]:
    """The site-packages folders of ``python`` (a venv's own, or the system's)."""
    out = _run(python, "-c", "import site; print('\\n'.join(site.getsitepackages()))")
    if out.returncode != 0:
        raise EnvError(f"{python} cannot list its site-packages: {out.stderr.strip().splitlines()[-1:]}")
    return [line for line in out.stdout.splitlines() if line]


def _pip(python: Path, *args: str, what: str) -> None:
    out = _run(python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir", *args)
    if out.returncode != 0:
        last = (out.stderr.strip() or out.stdout.strip()).splitlines()[-1:]
        raise EnvError(f"installing {what} failed: {last[0] if last else 'pip gave no reason'}")


def not_installed(wheels: list[Path]) -> list[str]:
    """For each wheel file that this Python does not show as installed at its version, or whose
    requirements what is installed here does not meet: one line naming the file and why."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.utils import parse_wheel_filename

    from profiling.gpu_wheels import unmet

    def installed_version(name: str) -> str | None:
        try:
            return distribution(name).version
        except PackageNotFoundError:
            return None

    found = []
    for wheel in wheels:
        name, version = parse_wheel_filename(wheel.name)[:2]
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            found.append(f"{wheel} was not installed: this Python has no {name}")
            continue
        if dist.version != str(version):
            found.append(f"{wheel} was not installed: {name} {dist.version} is what this Python has")
            continue
        for req, have in unmet(dist.requires or [], installed_version, {"extra": ""}):
            found.append(
                f"{wheel} needs {req}, which is not installed"
                if have is None
                else f"{wheel} needs {req}; {have} is installed"
            )
    return found


def carried_files(folder: Path) -> list[Path]:
    """The wheels of ``folder``; EnvError naming a file there that is not a wheel."""
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.is_file())
    other = [p.name for p in files if p.suffix != ".whl"]
    if other:
        raise EnvError(f"{folder} holds {', '.join(other)}, which no wheel install takes: run 'make gpu-wheels'")
    return files


def build(base: Path | str, env: Path, wheels: list[Path]) -> Path:
    """A fresh virtualenv at ``env`` over ``base``'s packages, with ``wheels`` and the package
    (editable) installed; returns its Python."""
    if _run(base, "-m", "pip", "--version").returncode != 0:
        raise EnvError(f"{base} has no pip, which installs the package offline: use a Python that has it")
    base_sites = _site_dirs(base)
    if env.exists() and not (env / "pyvenv.cfg").exists():
        raise EnvError(f"{env} exists and is not a virtualenv: name another folder (--env, or GPU_CHECK_ENV)")
    # Run by `base`: from inside a venv, venv builds on the interpreter under it.
    venv.EnvBuilder(clear=True, with_pip=False).create(env)
    python = env / "bin" / "python"
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    # addsitedir, not a plain path: the base's own .pth files (editable installs, say) apply too.
    lines = [f"import site; site.addsitedir({p!r})\n" for p in base_sites]
    Path(site, "_ijepa_gpu_check_base.pth").write_text("".join(lines))
    if wheels:
        _pip(python, "--no-compile", *map(str, wheels), what=f"the {len(wheels)} wheels of .whl/")
        verify = _run(python, "-m", "profiling.gpu_env", "--verify", *map(str, wheels))
        if verify.returncode != 0:
            lines = (verify.stdout.strip() or verify.stderr.strip()).splitlines()
            raise EnvError("; ".join(lines[-3:]) or "checking the installed wheels failed")
    if _run(python, "-c", "import setuptools").returncode != 0:
        raise EnvError(
            f"installing the package offline needs setuptools, which {base} lacks: "
            "run 'make gpu-wheels' to carry it in .whl/"
        )
    _pip(python, "--no-build-isolation", "-e", str(REPO), what="the package (pip install -e .)")
    if not imports_package(python):
        raise EnvError(f"{python} still cannot import ijepa_fast.kernels after installing the package")
    return python


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", type=Path, default=DEFAULT_ENV, help=f"the virtualenv to (re)build (default {DEFAULT_ENV})")
    p.add_argument("--wheels", type=Path, default=REPO / ".whl", help="folder of wheels to install (default .whl/)")
    p.add_argument("--verify", type=Path, nargs="+", help=argparse.SUPPRESS)  # run by the built Python
    args = p.parse_args(argv)
    if args.verify:
        found = not_installed(args.verify)
        print("\n".join(found))
        return 1 if found else 0
    try:
        wheels = carried_files(args.wheels)
    except EnvError as err:
        print(f"gpu_env: {err}", file=sys.stderr)
        return 1
    if not wheels and imports_package(sys.executable):
        print(f"environment: {sys.executable} as it is (it imports the package; no wheels carried)")
        print(sys.executable)
        return 0
    try:
        python = build(sys.executable, args.env, wheels)
    except EnvError as err:
        print(f"gpu_env: {err}", file=sys.stderr)
        return 1
    print(f"environment: {args.env}, a virtualenv over {sys.executable} with {len(wheels)} wheels and the package")
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
