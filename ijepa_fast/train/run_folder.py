"""A run folder used by one trainer at a time, with its config.yaml checked on resume.

``RunLock``: an advisory lock (``flock`` on ``run.lock``) whose file records the holder's pid and
host. The kernel drops a flock when its holder exits, however it exits (kill -9 included), so a lock
left by a crashed trainer is free: the record still names it, and the next trainer takes over with a
warning. A clean release empties the record. Where the filesystem has no flock, the record alone
decides: a live pid on this host, or any pid on another host, holds the folder.

``write_config``: the resolved config.yaml; on resume it is compared first with the run's stored
config (config.yaml, or the one in the checkpoint when config.yaml is gone).

Every file of the run folder is opened with ``checkpoint.no_follow``: one that is a symbolic link is
refused, not followed, since whoever can write a shared folder could point it at another user's file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

from ijepa_fast import config as config_mod
from ijepa_fast.config import RESUME_MAY_CHANGE, Config
from ijepa_fast.io.checkpoint import no_follow, refuse_link, write_atomically

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
CONFIG_NAME = "config.yaml"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # filesystems without flock

# Descriptors of the locks this process holds. A forked child (a DataLoader worker) shares them, and
# would keep the folder locked after this process is killed: each child closes its copies at once.
_held: set[int] = set()
_fork_hook_registered = False


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (locked, or a config change refused)."""


class RunLockedError(RunFolderError):
    """Another trainer holds the run folder."""


class ConfigChangedError(RunFolderError):
    """--resume with a config that differs from the run's stored config.yaml."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise ``RunLockedError`` naming the holder (pid, host)."""
        fd = no_follow(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _try_flock(fd)
            holder = _read_record(fd)
            if locked is False or (locked is None and holder is not None and _may_be_alive(holder)):
                raise RunLockedError(self._held_message(holder, flock=locked is not None))
            _write_record(fd, {"pid": os.getpid(), "host": socket.gethostname()})
        except BaseException:
            os.close(fd)
            raise
        if holder is not None:
            log.warning(
                "%s was left by pid %s on %s, which no longer holds it (killed?): taking it over",
                self.path,
                holder.get("pid"),
                holder.get("host"),
            )
        self._fd = fd
        _hold(fd)

    def release(self) -> None:
        """Empty the record and drop the lock (a no-op when not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _held.discard(fd)
        os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor drops the flock

    def _held_message(self, holder: dict | None, flock: bool) -> str:
        who = f"pid {holder.get('pid')} on host {holder.get('host')}" if holder else "another process"
        hint = "wait for it to finish, or choose another run.name / run.out_dir"
        if not flock:
            hint += f"; this filesystem has no flock: if no trainer runs there, delete {self.path}"
        return f"run folder {self.path.parent} is in use by {who} (lock {self.path}): {hint}"


def refuse_links(run_dir: Path, names: tuple[str, ...]) -> None:
    """Raise ``NotWritableError`` when a file ``names`` lists in ``run_dir`` is a symbolic link: at the
    start of a run, before anything is written, rather than when the file is first opened."""
    for name in names:
        refuse_link(Path(run_dir) / name)


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: another open file holds it; None: the filesystem has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in _NO_FLOCK:
            return None
        raise
    return True


def _read_record(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace").strip()
    if not text:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        record = None
    return record if isinstance(record, dict) else {"pid": "?", "host": f"? (unreadable record {text[:60]!r})"}


def _write_record(fd: int, record: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(record) + "\n").encode())
    os.fsync(fd)


def _may_be_alive(holder: dict) -> bool:
    """False only for a pid known dead on this host (another host's processes cannot be checked)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _hold(fd: int) -> None:
    global _fork_hook_registered
    _held.add(fd)
    if not _fork_hook_registered:
        os.register_at_fork(after_in_child=_close_held_in_child)
        _fork_hook_registered = True


def _close_held_in_child() -> None:
    for fd in _held:
        try:
            os.close(fd)  # not LOCK_UN: that would release the parent's lock too
        except OSError:
            pass
    _held.clear()


def write_config(
    run_dir: Path,
    cfg: Config,
    resumed_step: int | None,
    allow_change: bool = False,
    ranks: tuple[int, int] | None = None,
    saved: dict | None = None,
) -> None:
    """``check_config`` (same arguments), then write ``run_dir/config.yaml``: never through a link,
    and whole or not at all. A resume with any change keeps the stored file as
    ``config.prev-<step>.yaml``."""
    path = Path(run_dir) / CONFIG_NAME
    changes = check_config(run_dir, cfg, resumed_step, allow_change, ranks, saved)
    if changes:
        kept = _keep_previous(path, resumed_step) if path.exists() else f"in the checkpoint of step {resumed_step}"
        log.warning(
            "--resume from step %d with a changed config (%s); the old one is %s",
            resumed_step,
            "; ".join(_change_lines(changes)),
            kept,
        )
    _save(cfg, path)


def check_config(
    run_dir: Path,
    cfg: Config,
    resumed_step: int | None,
    allow_change: bool = False,
    ranks: tuple[int, int] | None = None,
    saved: dict | None = None,
) -> dict[str, tuple]:
    """Compare ``cfg`` with the stored config of the run resumed from ``resumed_step`` (None: not a
    resume); return the changes. The stored config is ``run_dir/config.yaml``, or, when that is gone,
    ``saved``: the config the checkpoint holds (``Config.to_dict``; None: nothing to compare with). A
    change of any key outside ``RESUME_MAY_CHANGE`` raises ``ConfigChangedError`` listing the
    changes, unless ``allow_change``. Writes nothing.

    ``ranks``: (the checkpoint's, this run's) number of ranks. When they differ, ``data.batch_size``
    and ``optim.grad_accum`` may change if the global batch (batch x ranks x accumulation) stays the
    run's, which keeps its schedules and the samples of every step; another global batch is a
    ``ConfigChangedError`` saying how to keep it, unless ``allow_change``."""
    path = Path(run_dir) / CONFIG_NAME
    refuse_link(path)
    if resumed_step is None:
        return {}
    if path.exists():
        stored, where = _stored(path), f"the run's {path}"
    elif saved is not None:
        where = f"the config stored in the checkpoint of step {resumed_step} ({path} is missing)"
        stored = _from_checkpoint(saved, where, allow_change)
        if stored is None:
            return {}
    else:
        return {}
    changes = config_mod.differences(stored, cfg)
    may_change = set(RESUME_MAY_CHANGE)
    if ranks is not None and ranks[0] != ranks[1]:
        _check_global_batch(Path(run_dir), stored, cfg, ranks, allow_change)
        may_change |= {"data.batch_size", "optim.grad_accum"}
    refused = [key for key in changes if key not in may_change]
    if refused and not allow_change:
        raise ConfigChangedError(
            f"--resume: the config differs from {where} in {', '.join(refused)} "
            f"({'; '.join(_change_lines(changes))}): resume with the stored values, or pass --allow-config-change"
        )
    return changes


def _change_lines(changes: dict[str, tuple]) -> list[str]:
    return [f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()]


def _check_global_batch(run_dir: Path, stored: Config, cfg: Config, ranks: tuple[int, int], allow_change: bool) -> None:
    """Resuming on another number of ranks: the global batch must stay the run's (see check_config)."""
    (saved_ranks, now_ranks), b, a = ranks, stored.data.batch_size, stored.optim.grad_accum
    before, now = b * saved_ranks * a, cfg.data.batch_size * now_ranks * cfg.optim.grad_accum
    if before == now or allow_change:
        return
    keep = []
    if before % (cfg.data.batch_size * now_ranks) == 0:
        keep.append(f"optim.grad_accum={before // (cfg.data.batch_size * now_ranks)}")
    if before % (now_ranks * cfg.optim.grad_accum) == 0:
        keep.append(f"data.batch_size={before // (now_ranks * cfg.optim.grad_accum)}")
    how = f"set {' or '.join(keep)} to keep it" if keep else "choose data.batch_size and optim.grad_accum to keep it"
    raise ConfigChangedError(
        f"--resume: the run in {run_dir} has a global batch of {before} ({b} per rank x {saved_ranks} ranks x "
        f"{a} accumulation) and this run {now} ({cfg.data.batch_size} x {now_ranks} ranks x {cfg.optim.grad_accum}): "
        f"{how} (schedules and data order follow it), or pass --allow-config-change"
    )


def _stored(path: Path) -> Config:
    try:
        return config_mod.load(str(path))
    except Exception as err:  # unreadable, bad YAML or invalid values: each means it cannot be compared
        raise ConfigChangedError(
            f"--resume: the run's stored {path} does not load ({err}): fix it or move it away"
        ) from None


def _from_checkpoint(saved: dict, where: str, allow_change: bool) -> Config | None:
    """The checkpoint's config (keys added since it was written read as their defaults); None when it
    does not load and ``allow_change`` waives the comparison."""
    try:
        return config_mod.from_dict(saved)
    except Exception as err:  # a key since removed, or a value no longer valid
        if allow_change:
            log.warning("--resume: %s does not load (%s): not compared (--allow-config-change)", where, err)
            return None
        raise ConfigChangedError(
            f"--resume: {where} does not load ({err}), so the config cannot be compared with it: restore "
            f"config.yaml, or pass --allow-config-change"
        ) from None


def _save(cfg: Config, path: Path) -> None:
    """``config_mod.save`` to a new temporary file, renamed over ``path`` (which may not be a link)."""
    write_atomically(path, lambda tmp: config_mod.save(cfg, str(tmp), opener=_new_file), lambda: refuse_link(path))


def _new_file(path: str, flags: int) -> int:
    """``open``'s opener for a file that must not exist yet (a link in its place included)."""
    return no_follow(path, flags | os.O_CREAT | os.O_EXCL)


def _keep_previous(path: Path, step: int) -> Path:
    """Copy ``path`` to ``config.prev-<step>.yaml`` (``-2``, ``-3``... when that name is taken)."""
    with open(path, "rb", opener=no_follow) as fh:
        text = fh.read()
    n = 1
    while True:
        kept = path.with_name(f"config.prev-{step:08d}.yaml" if n == 1 else f"config.prev-{step:08d}-{n}.yaml")
        try:
            with open(kept, "wb", opener=_new_file) as fh:
                fh.write(text)
            return kept
        except FileExistsError:  # a file, or a link, of that name
            n += 1
