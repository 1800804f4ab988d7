"""Fill ``.whl/`` with exactly the files ``profiling/gpu_wheels.txt`` carries to a bare GPU machine,
and prove that they install there.

    python -m profiling.gpu_wheels            # `make gpu-wheels`: fetch what is missing (network), then check
    python -m profiling.gpu_wheels --check    # check only, offline

The list names each carried file exactly. ``wheel`` lines are downloaded as they are for CPython
3.12 on manylinux x86-64 (``pip download --no-deps``); ``built`` lines are built here from their
source with nothing compiled (``pip wheel --no-deps``, ``BUILD_ENV``): DeepSpeed's wheel then holds
no op, and the GPU run needs none. The machine's own packages are listed in
``profiling/gpu_machine.txt``.

The check (``problems``): every listed file is a wheel that CPython 3.12 on manylinux x86-64
installs; every requirement of a carried package on that Python is carried, or on the machine, at a
version it accepts (a machine version the list does not know is checked there, by gpu_env); a
package the machine has travels only with the reason on its line. When ``.whl/`` exists: it holds
exactly the listed files (others are removed: two versions of one package would stop the install
there), they fit with the working tree in what one device call sends (64 MiB), and pip itself
(``install --dry-run`` for Python 3.12 on manylinux x86-64, from those files alone) selects every
one. Exit status 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIST = Path(__file__).with_name("gpu_wheels.txt")
MACHINE = Path(__file__).with_name("gpu_machine.txt")
LIMIT = 64 * 2**20  # bytes one device call sends: the working tree and .whl/ together
FORMS = ("wheel", "built")
# The GPU machines' Python and platform: CPython 3.12 on x86-64 Linux; the manylinux tags pip is told
# to accept for it (those its documentation names).
GPU_PYTHON = (3, 12)
GPU_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# The requirement markers of that Python (only what a marker can name).
GPU_MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}
# DeepSpeed's build switches: compile no op, and list the CUDA ops (all absent) rather than the
# build machine's CPU ones.
BUILD_ENV = {"DS_BUILD_OPS": "0", "DS_ACCELERATOR": "cuda"}


@dataclass(frozen=True)
class Entry:
    """One line of the list: a carried wheel file, how it is made, and why it travels when the
    machine has the package."""

    file: str
    form: str  # wheel | built
    reason: str = ""

    @property
    def name(self) -> str:
        return normalize(self.file.split("-")[0])

    @property
    def version(self) -> str:
        return self.file.split("-")[1]


def normalize(name: str) -> str:
    """A distribution name as PyPI compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_tags(file: str) -> frozenset:
    from packaging.utils import parse_wheel_filename

    return parse_wheel_filename(file)[3]


def gpu_tags() -> frozenset:
    """Every wheel tag CPython 3.12 on manylinux x86-64 installs."""
    from packaging import tags

    cpython = tags.cpython_tags(GPU_PYTHON, abis=["cp312"], platforms=list(GPU_PLATFORMS))
    return frozenset([*cpython, *tags.compatible_tags(GPU_PYTHON, "cp312", list(GPU_PLATFORMS))])


def read_list(path: Path = LIST) -> list[Entry]:
    """The entries of ``path``; ValueError naming the line of the first malformed one."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    entries: list[Entry] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 2)
        file, form = fields[0], fields[1] if len(fields) > 1 else ""
        where = f"{path.name}:{number}"
        try:
            parse_wheel_filename(file)
        except InvalidWheelFilename as err:
            raise ValueError(f"{where}: {file} is not a wheel file name ({err})") from None
        if form not in FORMS:
            raise ValueError(f"{where}: {form or 'nothing'} after {file}: expected one of {list(FORMS)}")
        entry = Entry(file, form, fields[2] if len(fields) > 2 else "")
        if any(e.name == entry.name for e in entries):
            raise ValueError(f"{where}: {entry.name} is on the list twice")
        entries.append(entry)
    return entries


def read_machine(path: Path = MACHINE) -> dict[str, str | None]:
    """{normalized name: version, or None where the list does not know it} of the machine's packages."""
    packages: dict[str, str | None] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            packages[normalize(name)] = version or None
    return packages


# ----------------------------------------------------------------------------------------- requirements


def _metadata_requires(text: str) -> list[str]:
    return Parser().parsestr(text).get_all("Requires-Dist") or []


def wheel_requires(path: Path) -> list[str]:
    """The Requires-Dist lines of a wheel file."""
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        return _metadata_requires(zf.read(name).decode())


def requires_from(folder: Path) -> Callable[[Entry], list[str]]:
    """The requirements of an entry: read from its wheel in ``folder`` when there, else from the
    installed distribution of the same version here (the CPU tests install every carried package)."""

    def requires(entry: Entry) -> list[str]:
        if (folder / entry.file).is_file():
            return wheel_requires(folder / entry.file)
        try:
            dist = importlib.metadata.distribution(entry.name)
        except importlib.metadata.PackageNotFoundError:
            dist = None
        if dist is None or dist.version != entry.version:
            here = f"{entry.name} {dist.version} is installed here" if dist else f"{entry.name} is not installed here"
            raise ValueError(f"cannot read the requirements of {entry.file}: it is not in {folder} and {here}")
        return dist.requires or []

    return requires


def unmet(requirements: list[str], version_of: Callable[[str], str | None], markers: dict[str, str]):
    """(requirement, the version ``version_of`` gives: None when absent) for each requirement whose
    marker holds under ``markers`` and that the version does not meet."""
    from packaging.requirements import Requirement

    for req in map(Requirement, requirements):
        if req.marker is not None and not req.marker.evaluate(markers):
            continue
        have = version_of(normalize(req.name))
        if have is None or not req.specifier.contains(have, prereleases=True):
            yield req, have


def problems(entries: list[Entry], machine: dict[str, str | None], requires: Callable[[Entry], list[str]]) -> list[str]:
    """What stops the carried set from installing beside the machine's packages on its Python."""
    found = []
    accepted = gpu_tags()
    carried = {e.name: e for e in entries}

    def version_of(name: str) -> str | None:  # a carried file's version, else the machine's
        return carried[name].version if name in carried else machine.get(name)

    for entry in entries:
        if not _wheel_tags(entry.file) & accepted:
            found.append(f"{entry.file} does not install on CPython 3.12, manylinux x86-64")
        if entry.name in machine and not entry.reason:
            found.append(f"{entry.file}: the machine has {entry.name}; carry it only with the reason on its line")
        for req, version in unmet(requires(entry), version_of, GPU_MARKERS):
            name = normalize(req.name)
            if name not in carried and name not in machine:
                found.append(f"{entry.file} requires {req}, which is neither carried nor on the machine")
            elif version is not None:
                where = "carried" if name in carried else "on the machine"
                found.append(f"{entry.file} requires {req}; {version} is {where}")
    return found


# ----------------------------------------------------------------------------------------- the folder


def stray_files(entries: list[Entry], folder: Path) -> list[Path]:
    """Files in ``folder`` that the list does not name."""
    wanted = {e.file for e in entries}
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name not in wanted)


def missing_entries(entries: list[Entry], folder: Path) -> list[Entry]:
    """Entries with no file in ``folder``."""
    return [e for e in entries if not (folder / e.file).is_file()]


def tree_bytes(repo: Path = REPO) -> int:
    """Bytes of the working tree that a device call sends: tracked and untracked, not ignored."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout
    files = (repo / f.decode() for f in out.split(b"\0") if f)
    return sum(f.stat().st_size for f in files if f.is_file())


def check_fits(folder: Path, tree: int, limit: int = LIMIT) -> str:
    """A one-line account of ``folder`` plus ``tree`` bytes; ValueError when over ``limit``."""
    carried = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    total = carried + tree
    line = f"{folder.name}/ {carried / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB = {total / 2**20:.1f} MiB"
    if total > limit:
        raise ValueError(f"{line}: over the {limit / 2**20:.0f} MiB one device call sends; carry fewer packages")
    return f"{line}, within {limit / 2**20:.0f} MiB"


def _isolated_pip_env() -> dict[str, str]:
    """pip without this machine's configuration (its find-links, indexes and constraints)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}


def _target_flags() -> list[str]:
    platforms = [flag for p in GPU_PLATFORMS for flag in ("--platform", p)]
    python = ".".join(map(str, GPU_PYTHON))
    return ["--only-binary=:all:", "--python-version", python, "--implementation", "cp", "--abi", "cp312", *platforms]


def pip_dry_run(entries: list[Entry], folder: Path) -> list[str]:
    """pip's own answer: ``install --dry-run`` of every entry, for Python 3.12 on manylinux x86-64,
    from ``folder`` alone; a problem for each listed file pip would not install."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--no-index"]
    cmd += ["--find-links", str(folder), *_target_flags(), "--quiet", "--report", "-"]
    cmd += [f"{e.name}=={e.version}" for e in entries]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_isolated_pip_env())
    if out.returncode != 0:
        last = (out.stderr.strip() or out.stdout.strip()).splitlines()[-1:]
        return [f"pip install --dry-run for CPython 3.12, manylinux x86-64 fails: {last[0] if last else '?'}"]
    chosen = {item["download_info"]["url"].rsplit("/", 1)[-1] for item in json.loads(out.stdout)["install"]}
    refused = [e.file for e in entries if e.file not in chosen]
    return [f"pip would not install {file} on CPython 3.12, manylinux x86-64" for file in refused]


def fetch(entries: list[Entry], dest: Path) -> None:
    """Download (``wheel``) or build (``built``) each entry into ``dest``; RuntimeError naming what failed."""
    pip = [sys.executable, "-m", "pip"]
    for entry in entries:
        spec = f"{entry.name}=={entry.version}"
        if entry.form == "wheel":
            cmd = [*pip, "download", "-q", "--no-deps", *_target_flags(), "-d", str(dest), spec]
            env = None
        else:
            cmd = [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-cache-dir"]
            cmd += [f"--no-binary={entry.name}", "-w", str(dest), spec]
            env = os.environ | BUILD_ENV
        if subprocess.run(cmd, env=env).returncode != 0:
            raise RuntimeError(f"pip {cmd[3]} failed for {spec} (network, or a version that does not exist)")
        if not (dest / entry.file).is_file():
            made = sorted(p.name for p in dest.glob(f"{entry.file.split('-')[0]}-*"))
            raise RuntimeError(f"pip made {made} for {spec}, not the listed {entry.file}: correct the list")


def check(entries: list[Entry], machine: dict[str, str | None], folder: Path) -> tuple[list[str], str]:
    """(problems, a one-line account) of the list, and of ``folder`` when it exists."""
    found = problems(entries, machine, requires_from(folder))
    if not folder.is_dir():
        return found, f"{len(entries)} files listed; {folder} does not exist (make gpu-wheels fills it)"
    missing = missing_entries(entries, folder)
    if missing:
        return [*found, f"{folder} lacks {' '.join(e.file for e in missing)}: run 'make gpu-wheels'"], ""
    try:
        account = check_fits(folder, tree_bytes())
    except ValueError as err:
        found.append(str(err))
        account = ""
    return [*found, *pip_dry_run(entries, folder)], f"{len(entries)} files, pip selects each; {account}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", type=Path, default=REPO / ".whl", help="the folder to fill (default .whl/)")
    p.add_argument("--check", action="store_true", help="check the list (and the folder, when it exists) only")
    args = p.parse_args(argv)
    try:
        entries, machine = read_list(), read_machine()
        if not args.check:
            args.dest.mkdir(exist_ok=True)
        if args.dest.is_dir():
            for stray in stray_files(entries, args.dest):
                print(f"gpu_wheels: removing {stray.name} (not in {LIST.name})")
                stray.unlink()
        if not args.check:
            fetch(missing_entries(entries, args.dest), args.dest)
        found, account = check(entries, machine, args.dest)
    except (ValueError, RuntimeError) as err:
        print(f"gpu_wheels: {err}", file=sys.stderr)
        return 1
    for line in found:
        print(f"gpu_wheels: {line}", file=sys.stderr)
    if not found:
        print(f"gpu_wheels: {account}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
