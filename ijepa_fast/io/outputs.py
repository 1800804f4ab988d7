"""The commands' output paths: checked before the work, written whole or not at all.

``check_file`` and ``check_folder`` find at start what would make the final write fail (the path is
a folder where a file goes, or a file where a folder goes; a parent that is a file; a folder that
cannot be written), so that a bad path costs no extraction, evaluation or benchmark. ``write_files``
writes each file to a temporary file beside it and renames them only once all are written: a failed
write (a full disk) leaves every path as it was and no temporary file. Both raise
``NotWritableError``, whose one-line message names the path and what to do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ijepa_fast.io.checkpoint import NotWritableError, not_writable, probe_write, write_atomically, write_remedy


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (what a ``mkdir -p`` of ``path`` starts from)."""
    path = path.absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return path.parents[-1]


def _check_can_create(path: Path, option: str, shown: Path) -> None:
    """``path`` (a folder, created when missing) can be made and written: every ancestor that exists is
    a folder, and the nearest one takes a new file."""
    base = _nearest_existing(path)
    if not base.is_dir():
        raise NotWritableError(
            f"{option} {shown}: {base} is a file, not a folder: move that file away or choose another {option}"
        )
    try:
        probe_write(base)
    except OSError as err:
        raise not_writable(f"{option} {shown}", err, option, where=base) from None


def check_file(path: str | Path, option: str, what: str | None = None) -> Path:
    """Refuse, before the work, a file path the command could not write: an existing folder, a parent
    that is a file, a folder that cannot be written. ``what`` names the file when it is not the path
    ``option`` gave (a file written beside it)."""
    path = Path(path)
    if path.is_dir():
        remedy = "move it away" if what else f"give a file name, e.g. {path / 'name'},"
        raise NotWritableError(f"{what or option} {path} is a folder, not a file: {remedy} or choose another {option}")
    _check_can_create(path.parent, option, path)
    return path


def check_folder(path: str | Path, option: str) -> Path:
    """Refuse, before the work, a folder the command could not create or write into: an existing
    file, a parent that is a file, a folder that cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotWritableError(f"{option} {path} is a file, not a folder: move it away or choose another {option}")
    _check_can_create(path, option, path)
    return path


def write_files(files: Sequence[tuple[str | Path, Callable[[Path], None]]]) -> None:
    """``write(tmp)`` for each ``(path, write)``, then the renames onto the paths, last file first:
    every file is written before any is replaced, so that a failure leaves all of them as they were
    (a file and the labels beside it never disagree). Parent folders are created."""
    _write_from([(Path(p), w) for p, w in files], 0)


def _write_from(files: list[tuple[Path, Callable[[Path], None]]], i: int) -> None:
    if i == len(files):
        return
    path, write = files[i]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, write, before_rename=lambda: _write_from(files, i + 1))
    except NotWritableError:  # a later file's, already naming it
        raise
    except OSError as err:  # name the file asked for, not its temporary one
        reason = err.strerror or str(err)
        raise NotWritableError(f"{path} could not be written ({reason}): {write_remedy(err)}") from None
