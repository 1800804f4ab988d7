"""Atomic, self-describing checkpoints that keep the last K and survive a kill at any moment.

A checkpoint is written to a temporary file in the same folder, flushed, fsync'ed and renamed over
its final name (rename is atomic on POSIX), then the folder is fsync'ed. ``latest.pt`` is a symlink
swapped atomically the same way. A process killed mid-write leaves at most a ``*.tmp`` file, which
loading ignores, so the previous checkpoint stays the latest loadable one; ``remove_partial_files``
deletes such files at the next start. Retention keeps the newest K checkpoints that load: a damaged
file never counts as one of them.

Contents (``FORMAT``): ``encoder``, ``predictor``, ``target_encoder`` (plain state dicts, no
``module.`` prefix), ``opt``, ``step`` (optimizer steps done), ``epoch``, ``loss``, ``batch_size``,
``world_size``, ``lr`` (the authors' keys, so their tools read ours), plus ``schedules``,
``mask_sampler``, ``rng``, ``config`` and ``format``. Only tensors, numbers, strings, lists and dicts:
``torch.load(weights_only=True)`` reads it.

Every checkpoint this package reads (ours, DeepSpeed's, the authors', an export) goes through
``load_file``: ``torch.load(weights_only=True)``, which cannot run code. A file holding other objects
is refused (``UntrustedCheckpointError``, naming the file and the object); a file that is not a
PyTorch checkpoint at all, or is damaged, is a ``NotACheckpointError``.

A write that fails (a full disk, a folder that cannot be written) raises an ``OSError`` naming the
checkpoint and removes its temporary file; ``check_writable`` finds an unwritable folder at start.
The run folder's other files are opened with ``no_follow``, which refuses a symbolic link.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "ijepa_fast/1"
_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")
# torch.save writes a zip archive; files from before PyTorch 1.6 are a pickle (protocol >= 2)
_TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")
TRUST_FLAG = "--trust-checkpoint (in Python: trust=True)"
_TEMP = re.compile(r"^\..+\.\d+\.tmp$")  # temp_path's names: .<final name>.<pid>.tmp
log = logging.getLogger(__name__)


class UntrustedCheckpointError(RuntimeError):
    """The file holds objects that ``torch.load(weights_only=True)`` refuses to unpickle."""


class NotACheckpointError(ValueError):
    """The file is not a PyTorch checkpoint (empty, text, other bytes), or it is damaged."""


class NotWritableError(OSError):
    """A folder or file (of the run, or a command's output) cannot be written; the message names it,
    the cause and what to do."""


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unmasked(err: BaseException) -> BaseException:
    """The exception behind ``err``: when a write fails (OSError) or a signal interrupts it
    (KeyboardInterrupt), torch.save's zip writer fails again while closing, and its RuntimeError
    hides the first exception as its context."""
    if isinstance(err, RuntimeError) and isinstance(err.__context__, (OSError, KeyboardInterrupt)):
        return err.__context__
    return err


def write_remedy(err: OSError) -> str:
    """What to do about a failed write, from its cause."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space on that disk"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make it writable"
    if err.errno in (errno.EEXIST, errno.ENOTDIR):
        return "move away the file that stands in its path"
    return "check that disk and folder"


def check_writable(folder: Path, what: str, setting: str) -> None:
    """Create ``folder`` and write and remove a small file in it, so that a folder that cannot be
    written fails at start rather than at the first checkpoint. The error names ``what`` the folder
    is and the ``setting`` that chooses another."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe_write(folder)
    except OSError as err:
        raise not_writable(f"{what} {folder}", err, setting) from None


def not_writable(subject: str, err: OSError, setting: str, where: Path | None = None) -> NotWritableError:
    """The one-line error for ``subject`` (what and its path) that a probe found unwritable: the cause,
    in ``where`` when that is another folder, what to do, and the ``setting`` that chooses another."""
    reason = err.strerror or str(err)
    cause = f"{where}: {reason}" if where is not None else reason
    return NotWritableError(f"{subject} cannot be written ({cause}): {write_remedy(err)}, or choose another {setting}")


def probe_write(folder: Path) -> None:
    """Create and remove a small file in ``folder``: OSError when the folder cannot be written."""
    fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=folder)
    os.close(fd)
    os.unlink(probe)


def temp_path(path: Path) -> Path:
    """Where ``path`` is written before its atomic rename (hidden, per process, removable after a crash)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomically(
    path: Path, write: Callable[[Path], None], before_rename: Callable[[], None] = lambda: None
) -> None:
    """``write(tmp)`` to ``temp_path(path)``, then ``before_rename()`` and the rename onto ``path``: a
    reader sees the old file or the whole new one, and a failure leaves no temporary file behind."""
    path = Path(path)
    tmp = temp_path(path)
    if tmp.is_symlink() or tmp.exists():  # left by a killed process that had this pid
        tmp.unlink()
    try:
        write(tmp)
        before_rename()
        os.replace(tmp, path)  # replaces the name: a link planted there is not followed
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


def no_follow(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """``os.open`` for a file of a run folder, also as ``open(..., opener=no_follow)``: a symbolic link
    there is a ``NotWritableError`` naming it, never followed (nor created through, when dangling):
    whoever can write a shared folder could point it at anyone's file."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as err:
        if err.errno != errno.ELOOP or not os.path.islink(path):
            raise
    raise _link_refused(Path(path))


def refuse_link(path: Path) -> None:
    """Raise ``NotWritableError`` when ``path`` is a symbolic link (see ``no_follow``)."""
    if os.path.islink(path):
        raise _link_refused(Path(path))


def _link_refused(path: Path) -> NotWritableError:
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:  # removed meanwhile
        target = ""
    return NotWritableError(
        f"{path} is a symbolic link{target}: no file of a run folder is written through a link, which could "
        f"point at anyone's file; delete the link, or choose another run folder"
    )


def remove_partial_files(folder: Path) -> list[Path]:
    """Delete the temporary files that writers killed mid-write left in ``folder``; return them.

    Only while no other process writes there (the trainer holds the run folder's lock).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    partial = [p for p in folder.iterdir() if _TEMP.match(p.name) and (p.is_symlink() or p.is_file())]
    for path in partial:
        path.unlink()
    return partial


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to ``path`` so that a reader sees the old file or the whole new one, never a part.

    A failed write raises an OSError naming ``path``; it, or a signal, leaves no temporary file behind."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        cause = _unmasked(err)
        if isinstance(cause, OSError):  # named after the checkpoint, not its temporary file
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from err
        if cause is not err:
            raise cause from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _point_latest(ckpt_dir: Path, name: str) -> None:
    tmp = temp_path(ckpt_dir / "latest.pt")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, ckpt_dir / "latest.pt")


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints, oldest first (temporary files are not listed)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(ckpt_dir: Path, state: dict[str, Any], step: int, keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``step``, point latest.pt at it, keep the newest ``keep``
    that load."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / checkpoint_name(step)
    atomic_torch_save({**state, "step": step, "format": FORMAT}, path)
    _point_latest(ckpt_dir, path.name)
    _retain(ckpt_dir, keep, written=path)
    return path


def _check_torch_file(path: Path) -> None:
    """Raise ``NotACheckpointError`` unless ``path`` starts like a file torch.save writes."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        raise NotACheckpointError(f"{path} is empty, not a checkpoint")
    if not head.startswith(_TORCH_FILE_STARTS):
        raise NotACheckpointError(f"{path} is not a checkpoint: it is not a file written by torch.save")


def load_file(
    path: str | Path,
    *,
    trust: bool = False,
    allowed: Iterable[Callable] = (),
    map_location: Any = "cpu",
    override: str | None = TRUST_FLAG,
) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers only.

    ``allowed``: further classes the file may hold (plain records, e.g. DeepSpeed's), allowed for
    this load only. Anything else raises ``UntrustedCheckpointError`` naming the file and the
    object: unpickling it could run arbitrary code. ``trust=True`` loads such a file with the full
    unpickler; ``override`` is the option that sets it, named in the error (None: the caller has no
    override). A file that torch.save did not write, or a damaged one, raises ``NotACheckpointError``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    _check_torch_file(path)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            # torch.serialization.load, not torch.load: the loads DeepSpeed makes with torch.load are
            # routed here while it reads checkpoints (engines.deepspeed.patches.weights_only_torch_load)
            return torch.serialization.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if not found:  # no refused object: bytes the unpickler cannot read
            raise NotACheckpointError(f"{path} is damaged or not a checkpoint: it does not unpickle") from None
        if not trust:
            raise UntrustedCheckpointError(_refusal(path, found.group(1), override)) from None
    except EOFError:
        raise NotACheckpointError(f"{path} is truncated or not a checkpoint: it ends too early") from None
    except RuntimeError as err:
        if "PytorchStreamReader" not in str(err):  # not the archive reader: not about the file's bytes
            raise
        raise NotACheckpointError(f"{path} is damaged or not a checkpoint ({_first_line(err)})") from None
    log.warning("%s: loading with the full unpickler (trusted); it holds %s", path, found.group(1))
    return torch.serialization.load(path, map_location=map_location, weights_only=False)


def _refusal(path: Path, name: str, override: str | None) -> str:
    way_out = (
        f"if you trust where the file comes from, pass {override}"
        if override
        else "there is no override here: this package never writes such objects"
    )
    return (
        f"{path} holds an object other than tensors, numbers, strings and containers ({name}), so it is "
        f"refused: unpickling it could run arbitrary code; {way_out}"
    )


def _first_line(err: BaseException) -> str:
    """The error's first sentence (torch's archive errors go on with generic advice), whole."""
    lines = str(err).strip().splitlines()
    first = re.split(r"(?<=\.)\s", lines[0])[0].rstrip(".") if lines else ""
    return first or type(err).__name__


def _retain(ckpt_dir: Path, keep: int, written: Path) -> None:
    """Delete every checkpoint older than the newest ``keep`` that load. One that does not load is
    not counted, so it never displaces a loadable one; it stays until ``keep`` newer ones load."""
    loadable = 0
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        if loadable >= keep:
            path.unlink()
        elif path == written or loads(path):
            loadable += 1
        else:
            log.warning("checkpoint %s does not load: kept, but not counted in run.keep_checkpoints", path)


def loads(path: Path) -> bool:
    """True when ``path`` loads as a checkpoint (memory-mapped: the tensors' bytes are not read)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # any damage (truncated, not a zip, not a checkpoint) means "does not load"
        return False
    return True


def newest_loadable(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint in ``ckpt_dir`` that loads, or None."""
    return next((path for _, path in reversed(list_checkpoints(ckpt_dir)) if loads(path)), None)


def load_latest(ckpt_dir: Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The newest checkpoint that loads; a damaged one is reported and the one before it tried.

    A checkpoint holding objects other than plain data is not damaged but foreign: it raises
    ``UntrustedCheckpointError`` (resuming has no override: the trainer never writes such objects).
    """
    for step, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return load_file(path, map_location=map_location, override=None)
        except NotACheckpointError as err:  # a damaged file must not hide the good one before it
            log.warning("checkpoint %s (step %d) does not load (%s); trying the previous one", path, step, err)
    return None


def rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), numpy and random, as tensors/lists for weights_only loads."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": _python_rng_to_list(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_rng_to_list(st: tuple) -> list:
    version, internal, gauss = st
    return [version, list(internal), gauss]
