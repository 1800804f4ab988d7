"""Background checkpoint writes (``io.async_save``, ``train.checkpointing``): the host copy shares
nothing with the live state, writes land one at a time and in order, a failed write raises where
the trainer waits, a kill -9 mid-write leaves the previous checkpoint the newest that loads, a run
with background saves writes the same checkpoints as one saving in the step, and the disk-space
check refuses (one line) or warns before step 0."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from ijepa_fast import config as config_mod
from ijepa_fast.io import async_save
from ijepa_fast.io import checkpoint as ckpt
from ijepa_fast.io.async_save import BackgroundWriter, InsufficientSpaceError, check_disk_space, host_copy
from ijepa_fast.train.trainer import Trainer
from tests.test_trainer import tiny_overrides, write_idx

REPO = Path(__file__).resolve().parent.parent
Usage = namedtuple("Usage", "total used free")


def test_host_copy_shares_nothing_with_the_live_state():
    live = {"w": torch.arange(6.0).view(2, 3), "opt": {"state": [torch.ones(2)], "lr": 0.1}, "name": "x"}
    copy = host_copy(live)
    live["w"].add_(100)  # the next step changes the live tensors in place
    live["opt"]["state"][0].zero_()
    assert torch.equal(copy["w"], torch.arange(6.0).view(2, 3)) and torch.equal(copy["opt"]["state"][0], torch.ones(2))
    assert copy["opt"]["lr"] == 0.1 and copy["name"] == "x" and isinstance(copy["opt"]["state"], list)
    again = host_copy(live, into=copy)  # the buffers of an earlier copy are reused, the values new
    assert again["w"] is copy["w"] and torch.equal(again["w"], live["w"])
    assert torch.equal(again["opt"]["state"][0], torch.zeros(2))
    resized = host_copy({**live, "w": torch.ones(3)}, into=copy)
    assert resized["w"] is not copy["w"] and torch.equal(resized["w"], torch.ones(3))


def test_writes_run_one_at_a_time_in_order_and_errors_reach_the_waiter():
    events, release = [], threading.Event()

    def first():
        events.append("first starts")
        release.wait(5)
        events.append("first ends")
        return 1

    writer = BackgroundWriter()
    writer.submit(first)
    time.sleep(0.05)
    assert writer.busy and events == ["first starts"]  # submit returned while the write goes on
    threading.Timer(0.1, release.set).start()
    writer.submit(lambda: events.append("second") or 2)  # joins the first before starting
    assert writer.join() == 2 and events == ["first starts", "first ends", "second"]

    def full_disk():
        raise OSError(28, "No space left on device", "/runs/x/ckpt.pt")

    writer.submit(full_disk)
    with pytest.raises(OSError, match="No space left"):
        writer.join()
    assert writer.join() is None  # raised once


_KILLED_WRITER = """
import io, sys, time, torch
from pathlib import Path
from ijepa_fast.io import checkpoint as ckpt
from ijepa_fast.io.async_save import BackgroundWriter, host_copy

folder = Path(sys.argv[1])
ckpt.save_checkpoint(folder, {"w": torch.full((4,), 1.0)}, 1, keep=3)
real_save = torch.save

def slow_save(obj, fh, *args, **kwargs):  # half the real bytes, then hang until killed
    buf = io.BytesIO()
    real_save(obj, buf)
    fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    fh.flush()
    print("writing", flush=True)
    time.sleep(60)

torch.save = slow_save
state = host_copy({"w": torch.full((1 << 18,), 2.0)})
BackgroundWriter().submit(lambda: ckpt.save_checkpoint(folder, state, 2, keep=3))
time.sleep(60)
"""


def test_kill_9_during_a_background_write_keeps_the_previous_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(folder)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        partial = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
        assert len(partial) == 1 and partial[0].stat().st_size > 0  # half a file, in the background thread
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert [s for s, _ in ckpt.list_checkpoints(folder)] == [1]  # the half file is not a checkpoint
    assert ckpt.newest_loadable(folder) == folder / ckpt.checkpoint_name(1)
    assert torch.equal(ckpt.load_latest(folder)["w"], torch.full((4,), 1.0))
    assert ckpt.remove_partial_files(folder) == partial and not partial[0].exists()


def _tiny(tmp_path: Path, name: str, **extra) -> config_mod.Config:
    data = tmp_path / "data"
    if not data.exists():
        write_idx(data, n=48)
    return config_mod.load(None, tiny_overrides(data, tmp_path / "runs", name, **extra))


@pytest.fixture
def one_thread():
    """One torch thread: on a shared machine, OpenMP's waits make a tiny run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same_tree, a, b))
    return a == b


def test_a_run_with_background_saves_leaves_every_checkpoint_written(tmp_path, one_thread):
    """Saves at every step, each joined before the next starts and the last before fit returns:
    retention keeps the newest, latest.pt names the last, and it holds the final weights. The
    file is the one a save in the step writes (same tree, loaded with ``weights_only=True``), and a
    step after the copy does not reach it. (The trainer's resume tests, bitwise after a kill -9, run
    with background saves: the default.)"""
    extra = {"run.checkpoint_every": 1, "run.keep_checkpoints": 1, "optim.max_steps": 2, "run.log_every": 2}
    trainer = Trainer(_tiny(tmp_path, "async", **extra))
    assert trainer.saver.background
    result = trainer.fit()
    assert result.steps == 2 and not trainer.saver.writer.busy
    folder = result.run_dir / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(folder)] == [2] and os.readlink(
        folder / "latest.pt"
    ) == ckpt.checkpoint_name(2)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    saved = torch.load(folder / "latest.pt", map_location="cpu", weights_only=True)
    engine, meta = trainer.engine, {"note": "x"}
    in_step = engine.save(tmp_path / "sync", 2, meta, keep=1)
    path, write = engine.save_async(tmp_path / "background", 2, meta, keep=1)
    with torch.no_grad():
        for p in engine.student.parameters():
            p.add_(1.0)  # the next step changes the live weights before the write runs
    assert write() == path and path.name == in_step.name
    a, b = (torch.load(f, map_location="cpu", weights_only=True) for f in (in_step, path))
    a.pop("rng"), b.pop("rng")
    assert _same_tree(a, b) and a["note"] == "x"
    for key in ("encoder", "predictor", "target_encoder", "opt"):
        assert _same_tree(saved[key], a[key]), key


def _disk(free: int):
    return lambda path: Usage(10 * free, 9 * free, free)


def test_disk_space_refuses_with_one_line_and_warns_when_tight(tmp_path, monkeypatch):
    gb = 10**9
    monkeypatch.setattr(async_save.shutil, "disk_usage", _disk(35 * gb))
    with pytest.raises(InsufficientSpaceError) as err:
        check_disk_space(tmp_path / "run" / "checkpoints", 10 * gb, keep=3)  # 4 x 10 GB > 35 GB
    msg = str(err.value)
    assert "\n" not in msg and "40.00 GB" in msg and "35.00 GB free" in msg and "run.keep_checkpoints" in msg
    assert "nearly full" in check_disk_space(tmp_path, 10 * gb, keep=2)  # 30 of 35 GB
    assert check_disk_space(tmp_path, 10 * gb, keep=1) is None  # 20 of 35 GB
    old = tmp_path / "ckpt-00000001.pt"
    old.write_bytes(b"x" * 1000)  # retention deletes it as new ones land: its bytes count as room
    monkeypatch.setattr(async_save.shutil, "disk_usage", _disk(3500))
    with pytest.raises(InsufficientSpaceError):
        check_disk_space(tmp_path, 1000, keep=3)  # 4000 > 3500
    assert "nearly full" in check_disk_space(tmp_path, 1000, keep=3, existing=[old])  # 4000 <= 3500 + 1000
    tags = tmp_path / "deepspeed"  # a sharded engine's folder: every file under it counts, links do not
    (tags / "step_00000001").mkdir(parents=True)
    (tags / "step_00000001" / "shard.pt").write_bytes(b"x" * 600)
    (tags / "latest").write_bytes(b"x" * 400)
    (tags / "elsewhere").symlink_to(old)
    with pytest.raises(InsufficientSpaceError):
        check_disk_space(tmp_path, 1050, keep=3, existing=[tags / "step_00000001"])  # 4200 > 3500 + 600
    assert "nearly full" in check_disk_space(tmp_path, 1050, keep=3, existing=[tags])  # 4200 <= 3500 + 1000


def test_a_run_that_cannot_fit_its_checkpoints_stops_before_step_0(tmp_path, monkeypatch, caplog, one_thread):
    cfg = _tiny(tmp_path, "small-disk")
    monkeypatch.setattr(async_save.shutil, "disk_usage", _disk(1000))
    with pytest.raises(InsufficientSpaceError, match=r"4 checkpoints of about .* need .* but its disk has"):
        Trainer(cfg)
    assert not ckpt.list_checkpoints(tmp_path / "runs" / "small-disk" / "checkpoints")
    monkeypatch.undo()
    trainer = Trainer(cfg)  # the real disk: the same run starts
    need = trainer.engine.checkpoint_bytes() * (cfg.run.keep_checkpoints + 1)
    trainer.close()
    monkeypatch.setattr(async_save.shutil, "disk_usage", _disk(int(need * 1.1)))
    Trainer(_tiny(tmp_path, "tight-disk")).close()
    assert any("nearly full" in r.message for r in caplog.records)


def test_a_resume_counts_a_sharded_engines_kept_checkpoints_as_room(tmp_path, monkeypatch):
    """One checkpoint of 4000 bytes: 1000 in checkpoints/, 3000 in the engine's own folder. Keeping
    one, a resume needs 8000 bytes in all, 4000 of which the kept checkpoint already holds."""
    from types import SimpleNamespace

    from ijepa_fast.train.checkpointing import Checkpointer

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / ckpt.checkpoint_name(1)).write_bytes(b"x" * 1000)
    (run / "deepspeed" / "step_00000001").mkdir(parents=True)
    (run / "deepspeed" / "step_00000001" / "shard.pt").write_bytes(b"x" * 3000)

    def folders(run_dir: Path, is_main: bool) -> list[tuple[Path, str]]:
        return [(run_dir / "deepspeed", "its own"), (run_dir / "checkpoints", "the exports")]

    engine = SimpleNamespace(checkpoint_bytes=lambda: 4000, checkpoint_folders=folders)
    saver = Checkpointer(engine, run, keep=1, meta=lambda step, loss: {}, start_step=1)
    monkeypatch.setattr(async_save.shutil, "disk_usage", _disk(4500))
    saver.check_space()  # 8000 <= 4500 + 4000
    shutil.rmtree(run / "deepspeed")
    with pytest.raises(InsufficientSpaceError):
        saver.check_space()  # 8000 > 4500 + 1000
