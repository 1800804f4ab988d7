"""Checkpoints: atomic writes, keep-last-K, a kill mid-write leaves the previous one loadable, and
nothing but plain data is ever unpickled."""

from __future__ import annotations

import builtins
import errno
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ijepa_fast.io import checkpoint as ckpt
from tests.payloads import plant


def test_save_keeps_last_k_and_points_latest(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, {"w": torch.full((3,), float(step))}, step, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    assert os.readlink(tmp_path / "latest.pt") == "ckpt-00000004.pt"
    state = ckpt.load_latest(tmp_path)
    assert state["step"] == 4 and state["format"] == ckpt.FORMAT and torch.equal(state["w"], torch.full((3,), 4.0))


def test_damaged_newest_falls_back_to_the_previous(tmp_path, caplog):
    ckpt.save_checkpoint(tmp_path, {"w": torch.ones(2)}, 1, keep=3)
    (tmp_path / ckpt.checkpoint_name(2)).write_bytes(b"not a checkpoint")
    assert ckpt.load_latest(tmp_path)["step"] == 1
    assert "does not load" in caplog.text


def test_a_payload_planted_in_the_latest_checkpoint_is_refused_naming_it_and_runs_nothing(tmp_path):
    ckpt.save_checkpoint(tmp_path, {"w": torch.ones(2)}, 1, keep=3)
    path = ckpt.save_checkpoint(tmp_path, {"w": torch.ones(2)}, 2, keep=3)
    plant(path, tmp_path / "ran")
    # refused, not skipped for step 1 as a damaged file would be: someone put it there
    with pytest.raises(ckpt.UntrustedCheckpointError, match=re.escape(str(path))) as err:
        ckpt.load_latest(tmp_path)
    assert "posix.system" in str(err.value) and "no override" in str(err.value)
    assert not (tmp_path / "ran").exists()


def test_files_that_are_not_checkpoints_are_named_as_such(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3)}, good)
    contents = {"empty": b"", "text": b"step: 3\n", "garbage": bytes(range(7, 250)), "half": good.read_bytes()[:300]}
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ckpt.NotACheckpointError, match=re.escape(str(tmp_path / name))) as err:
            ckpt.load_file(tmp_path / name)
        assert "not a checkpoint" in str(err.value) and "trust" not in str(err.value)
        assert "likelihood" not in str(err.value)  # torch's generic advice after the reason is left out
    (tmp_path / "zip").write_bytes(b"PK\x03\x04 not a zip archive at all")
    with pytest.raises(ckpt.NotACheckpointError, match=r"\(PytorchStreamReader failed reading zip archive: [^()]+\)$"):
        ckpt.load_file(tmp_path / "zip")


class _FullDiskFile:
    """A file on a disk with ``room`` bytes left: a write past it raises ENOSPC, as the kernel does."""

    def __init__(self, fh, room: int):
        self.fh, self.room = fh, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def fill_disk_while_writing(monkeypatch, name: str, room: int = 4096) -> None:
    """Checkpoint files whose name contains ``name`` run out of disk after ``room`` bytes."""

    def open_(path, mode="r", *args, **kwargs):
        fh = builtins.open(path, mode, *args, **kwargs)  # noqa: SIM115 (the caller closes it)
        return _FullDiskFile(fh, room) if "w" in mode and name in os.path.basename(path) else fh

    monkeypatch.setattr(ckpt, "open", open_, raising=False)


def test_a_full_disk_names_the_checkpoint_keeps_the_previous_and_leaves_no_partial_file(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, {"w": torch.arange(5.0)}, 1, keep=3)
    fill_disk_while_writing(monkeypatch, ckpt.checkpoint_name(2))
    with pytest.raises(OSError) as raised:  # torch's zip writer turns the write error into a RuntimeError
        ckpt.save_checkpoint(tmp_path, {"w": torch.zeros(1 << 16)}, 2, keep=3)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / ckpt.checkpoint_name(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.checkpoint_name(1), "latest.pt"]
    assert os.readlink(tmp_path / "latest.pt") == ckpt.checkpoint_name(1)
    assert torch.equal(ckpt.load_latest(tmp_path)["w"], torch.arange(5.0))


_SLOW_WRITER = """
import sys, time, torch
from ijepa_fast.io import checkpoint as ckpt

class Slow:  # pickled after the big tensor: the write stalls half-way, like a slow disk
    def __reduce__(self):
        time.sleep(60)
        return (int, (0,))

ckpt.save_checkpoint(sys.argv[1], {"w": torch.zeros(1 << 20), "slow": Slow()}, 2, keep=3)
"""


def test_kill_during_a_checkpoint_write_leaves_the_previous_loadable(tmp_path):
    ckpt.save_checkpoint(tmp_path, {"w": torch.arange(5.0)}, 1, keep=3)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(tmp_path)])
    try:
        deadline = time.time() + 60
        while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.time() < deadline, "the writer never started its temporary file"
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    state = ckpt.load_latest(tmp_path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(5.0))
    assert os.readlink(tmp_path / "latest.pt") == "ckpt-00000001.pt"
    # What the kill left is removed at the next start; the complete checkpoint and latest.pt stay.
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert left and sorted(ckpt.remove_partial_files(tmp_path)) == sorted(left)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001.pt", "latest.pt"]


def test_retention_keeps_the_newest_k_that_load(tmp_path, caplog):
    """keep=2 with a damaged checkpoint 3 (cut short, as by a full disk) among them: saving 4 keeps
    2 and 4, the two newest that load; 1 goes; 3 is neither counted nor able to displace 2."""
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, {"w": torch.full((1000,), float(step))}, step, keep=3)
    damaged = tmp_path / ckpt.checkpoint_name(3)
    damaged.write_bytes(damaged.read_bytes()[:-200])
    ckpt.save_checkpoint(tmp_path, {"w": torch.full((1000,), 4.0)}, 4, keep=2)
    loadable = []
    for step, path in ckpt.list_checkpoints(tmp_path):
        try:
            loadable.append(int(torch.load(path, weights_only=True)["step"]))
        except Exception:
            assert step == 3
    assert loadable == [2, 4]
    assert f"checkpoint {damaged} does not load" in caplog.text
    assert ckpt.newest_loadable(tmp_path) == tmp_path / ckpt.checkpoint_name(4)


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    state = ckpt.rng_state()
    ckpt.save_checkpoint(tmp_path, {"rng": state}, 1, keep=1)
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(99)
    np.random.seed(99)
    ckpt.set_rng_state(ckpt.load_latest(tmp_path)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
