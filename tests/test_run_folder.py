"""The run folder lock on its own: held across processes, not kept by forked children, released
cleanly, and decided by its record where the filesystem has no flock."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from ijepa_fast.io.checkpoint import NotWritableError
from ijepa_fast.train import run_folder
from ijepa_fast.train.run_folder import RunLock, RunLockedError

# Takes the lock, forks a child that outlives it (as a DataLoader worker does), then waits to be killed.
_HOLDER_WITH_CHILD = """
import os, sys, time
from ijepa_fast.train.run_folder import RunLock
RunLock(sys.argv[1]).acquire()
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


def test_a_forked_child_does_not_keep_the_lock_after_its_holder_is_killed(tmp_path, caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER_WITH_CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(RunLockedError, match=f"in use by pid {holder.pid} on host"):
            RunLock(tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the child still runs...
        lock = RunLock(tmp_path)
        lock.acquire()  # ...and the lock is free all the same
        assert f"left by pid {holder.pid}" in caplog.text
        lock.release()
    finally:
        for pid in (holder.pid, child):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_released_lock_is_free_and_leaves_no_warning(tmp_path, caplog):
    first = RunLock(tmp_path)
    first.acquire()
    assert json.loads((tmp_path / "run.lock").read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
    with pytest.raises(RunLockedError):  # another open file description in this very process
        RunLock(tmp_path).acquire()
    first.release()
    assert (tmp_path / "run.lock").read_text() == ""
    second = RunLock(tmp_path)
    second.acquire()
    second.release()
    assert "taking it over" not in caplog.text


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    "record,taken",
    [
        (lambda: {"pid": _dead_pid(), "host": socket.gethostname()}, True),
        (lambda: {"pid": os.getpid(), "host": socket.gethostname()}, False),
        (lambda: {"pid": 1, "host": "another-host.invalid"}, False),
    ],
    ids=["dead-pid-here", "live-pid-here", "other-host"],
)
def test_without_flock_the_record_decides(tmp_path, monkeypatch, caplog, record, taken):
    """A filesystem without flock (ENOLCK): a dead pid on this host is taken over with a warning; a
    live one, or any pid on another host (which cannot be checked), holds the folder."""

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    held = record()
    (tmp_path / "run.lock").write_text(json.dumps(held))
    lock = RunLock(tmp_path)
    if taken:
        lock.acquire()
        assert f"left by pid {held['pid']}" in caplog.text
        lock.release()
    else:
        with pytest.raises(RunLockedError, match=f"pid {held['pid']} on host {held['host']}.*delete"):
            lock.acquire()
    assert not run_folder._held
    if not taken:  # a refused attempt leaves the holder's record as it was
        assert json.loads((tmp_path / "run.lock").read_text()) == held


def _config(batch: int, accum: int):
    from ijepa_fast.config import Config

    cfg = Config()
    cfg.data.batch_size, cfg.optim.grad_accum = batch, accum
    return cfg.validate()


@pytest.mark.parametrize("batch, accum", [(8, 2), (16, 1)])
def test_a_resume_on_other_ranks_may_change_batch_and_accumulation_when_the_global_batch_stays(tmp_path, batch, accum):
    """Saved on 16 ranks x 8 x 1 = 128; resumed on 8 ranks x 8 x 2 or x 16 x 1: accepted."""
    run_folder.write_config(tmp_path, _config(8, 1), None)
    run_folder.write_config(tmp_path, _config(batch, accum), 10, ranks=(16, 8))
    stored = run_folder._stored(tmp_path / "config.yaml")
    assert (stored.data.batch_size, stored.optim.grad_accum) == (batch, accum)


def test_a_resume_on_other_ranks_with_another_global_batch_is_refused_saying_how_to_keep_it(tmp_path):
    run_folder.write_config(tmp_path, _config(8, 1), None)
    with pytest.raises(run_folder.ConfigChangedError) as err:
        run_folder.write_config(tmp_path, _config(8, 1), 10, ranks=(16, 8))
    assert str(err.value) == (
        f"--resume: the run in {tmp_path} has a global batch of 128 (8 per rank x 16 ranks x 1 accumulation) "
        "and this run 64 (8 x 8 ranks x 1): set optim.grad_accum=2 or data.batch_size=16 to keep it "
        "(schedules and data order follow it), or pass --allow-config-change"
    )
    run_folder.write_config(tmp_path, _config(8, 1), 10, allow_change=True, ranks=(16, 8))
    with pytest.raises(run_folder.ConfigChangedError, match="optim.grad_accum: 1 -> 2"):  # same ranks: any change
        run_folder.write_config(tmp_path, _config(8, 2), 20, ranks=(8, 8))


@pytest.mark.parametrize("target_exists", [True, False], ids=["to-a-file", "dangling"])
def test_a_run_lock_that_is_a_symlink_is_refused_and_its_target_left_alone(tmp_path, target_exists):
    """Whoever can write a shared run folder could point run.lock at another user's file: taking the
    lock must neither write into that file nor create it."""
    victim = tmp_path / "victim.txt"
    if target_exists:
        victim.write_text("another user's file\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").symlink_to(victim)
    with pytest.raises(NotWritableError) as err:
        RunLock(run).acquire()
    assert str(err.value).startswith(f"{run / 'run.lock'} is a symbolic link (to {victim})")
    assert "\n" not in str(err.value)
    assert not run_folder._held
    if target_exists:
        assert victim.read_text() == "another user's file\n"
    else:
        assert not victim.exists()


def test_config_yaml_and_its_kept_copies_are_never_written_through_a_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("another user's file\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").symlink_to(victim)
    with pytest.raises(NotWritableError, match=f"^{re.escape(str(run / 'config.yaml'))} is a symbolic link"):
        run_folder.write_config(run, _config(8, 1), None)
    with pytest.raises(NotWritableError, match=f"^{re.escape(str(run / 'config.yaml'))} is a symbolic link"):
        run_folder.write_config(run, _config(8, 1), 10)  # a resume reads it first: refused as well
    (run / "config.yaml").unlink()

    run_folder.write_config(run, _config(8, 1), None)
    (run / "config.prev-00000010.yaml").symlink_to(victim)  # the name a changed resume keeps the old one as
    run_folder.write_config(run, _config(8, 2), 10, allow_change=True)
    assert victim.read_text() == "another user's file\n"
    assert run_folder._stored(run / "config.prev-00000010-2.yaml").optim.grad_accum == 1
    assert run_folder._stored(run / "config.yaml").optim.grad_accum == 2
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # no temporary file left
