"""Checkpoints: atomic writes, keep-last-K, a kill mid-write leaves the previous one loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from ijepa_fast import checkpoint as ckpt


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


_SLOW_WRITER = """
import sys, time, torch
from ijepa_fast import checkpoint as ckpt

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
