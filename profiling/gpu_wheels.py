"""Fill ``.whl/`` with exactly what ``profiling/gpu_wheels.txt`` carries to a bare GPU machine, and
check that it fits, with the working tree, in what one device call sends (64 MiB).

    python -m profiling.gpu_wheels            # `make gpu-wheels`: download (network), then check
    python -m profiling.gpu_wheels --check    # check .whl/ only

Each carried package is downloaded alone (``pip download --no-deps``) at the list's version: a
py3-none-any wheel, or the source archive for ``sdist`` lines. Files in ``.whl/`` that the list
does not name are removed (two versions of one package would stop the install there). Exit status
1, with one line saying why, when a download fails or the total is over the limit.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIST = Path(__file__).with_name("gpu_wheels.txt")
LIMIT = 64 * 2**20  # bytes one device call sends: the working tree and .whl/ together
FORMS = {"wheel", "sdist", "machine", "absent"}
# The Python the GPU machines run, for the requirement markers of what travels there.
GPU_PYTHON = "3.12"


@dataclass(frozen=True)
class Entry:
    """One line of the list."""

    name: str
    version: str | None  # None for `machine` lines
    form: str  # wheel | sdist | machine | absent
    reason: str  # why an `absent` package stays behind

    @property
    def carried(self) -> bool:
        return self.form in ("wheel", "sdist")


def normalize(name: str) -> str:
    """A distribution name as PyPI compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_list(path: Path = LIST) -> list[Entry]:
    """The entries of ``path``; ValueError naming the line of the first malformed one."""
    entries: list[Entry] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 2)
        spec, form, reason = fields[0], fields[1] if len(fields) > 1 else "", fields[2] if len(fields) > 2 else ""
        name, _, version = spec.partition("==")
        where = f"{path.name}:{number}"
        if form not in FORMS:
            raise ValueError(f"{where}: {form or 'nothing'} after {spec}: expected one of {sorted(FORMS)}")
        if form != "machine" and not version:
            raise ValueError(f"{where}: {name} needs an exact version (NAME==VERSION) for a '{form}' line")
        if form == "absent" and not reason:
            raise ValueError(f"{where}: {name} is 'absent': say why after the word")
        entries.append(Entry(name, version or None, form, reason))
    return entries


def dist_of(filename: str) -> tuple[str, str] | None:
    """(normalized name, version) of a wheel or ``.tar.gz`` source archive file name, else None."""
    if filename.endswith(".whl"):
        parts = filename[: -len(".whl")].split("-")
        return (normalize(parts[0]), parts[1]) if len(parts) >= 5 else None
    if filename.endswith(".tar.gz"):
        name, _, version = filename[: -len(".tar.gz")].rpartition("-")
        return (normalize(name), version) if name else None
    return None


def stray_files(entries: list[Entry], folder: Path) -> list[Path]:
    """Files in ``folder`` that are not a carried entry at its version."""
    wanted = {(normalize(e.name), e.version) for e in entries if e.carried}
    return sorted(p for p in folder.iterdir() if p.is_file() and dist_of(p.name) not in wanted)


def missing_entries(entries: list[Entry], folder: Path) -> list[Entry]:
    """Carried entries with no file in ``folder``."""
    have = {dist_of(p.name) for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()
    return [e for e in entries if e.carried and (normalize(e.name), e.version) not in have]


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


def download(entries: list[Entry], dest: Path) -> None:
    """``pip download --no-deps`` each carried entry into ``dest`` (one call per form)."""
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    for form, flags in (("wheel", ["--only-binary=:all:"]), ("sdist", ["--no-binary=:all:", "--no-build-isolation"])):
        specs = [f"{e.name}=={e.version}" for e in entries if e.form == form]
        if specs and subprocess.run([*pip, *flags, *specs]).returncode != 0:
            raise RuntimeError(f"pip download failed for {' '.join(specs)} (network, or a version that does not exist)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", type=Path, default=REPO / ".whl", help="the folder to fill (default .whl/)")
    p.add_argument("--check", action="store_true", help="check the folder, download nothing")
    args = p.parse_args(argv)
    try:
        entries = read_list()
        args.dest.mkdir(exist_ok=True)
        for stray in stray_files(entries, args.dest):
            print(f"gpu_wheels: removing {stray.name} (not in {LIST.name})")
            stray.unlink()
        if not args.check:
            download(missing_entries(entries, args.dest), args.dest)
        missing = missing_entries(entries, args.dest)
        if missing:
            names = " ".join(f"{e.name}=={e.version}" for e in missing)
            raise ValueError(f"{args.dest} lacks {names}: run 'make gpu-wheels'")
        print(f"gpu_wheels: {len([e for e in entries if e.carried])} packages; {check_fits(args.dest, tree_bytes())}")
    except (ValueError, RuntimeError) as err:
        print(f"gpu_wheels: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
