"""Optional Weights & Biases logging (run.wandb): what the trainer hands W&B, against metrics.csv;
resumed runs keep their W&B id; a missing package is an error before training; a real offline run
when wandb is installed."""

from __future__ import annotations

import json
import struct
import sys
import types
from pathlib import Path

import pytest

from ijepa_fast import config as config_mod
from ijepa_fast.runtime import optional
from ijepa_fast.train.metrics import WANDB_ID_FILE, read_metrics
from ijepa_fast.train.trainer import Trainer
from tests.test_trainer import tiny_overrides, write_idx


class FakeRun:
    def __init__(self, kwargs: dict):
        self.kwargs = kwargs
        self.logged: list[tuple[int, dict]] = []
        self.finished = 0

    def log(self, scalars: dict, step: int) -> None:
        self.logged.append((step, dict(scalars)))

    def finish(self) -> None:
        self.finished += 1


def fake_wandb_module(runs: list[FakeRun]) -> types.ModuleType:
    """The part of wandb's API the trainer uses, recording each run."""
    module = types.ModuleType("wandb")

    def init(**kwargs):
        runs.append(FakeRun(kwargs))
        return runs[-1]

    module.init = init
    return module


@pytest.fixture
def fake_wandb(monkeypatch):
    runs: list[FakeRun] = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb_module(runs))
    optional._try_import.cache_clear()
    yield runs
    optional._try_import.cache_clear()


def test_on_means_offline_and_every_logged_row_reaches_wandb_as_in_metrics_csv(tmp_path, fake_wandb):
    data = write_idx(tmp_path / "data", n=48)  # 6 steps of 8
    cfg = config_mod.load(None, tiny_overrides(data, tmp_path / "runs", "w", **{"run.wandb": "on"}))
    Trainer(cfg).fit()
    run_dir = tmp_path / "runs" / "w"
    (run,) = fake_wandb
    assert run.kwargs["mode"] == "offline"  # "on" never uploads
    assert Path(run.kwargs["dir"]) == run_dir and run.kwargs["name"] == "w"
    assert run.kwargs["config"] == cfg.to_dict() and run.kwargs["resume"] == "allow"
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == run.kwargs["id"]
    rows = read_metrics(run_dir / "metrics.csv")
    assert [step for step, _ in run.logged] == [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    for (_, scalars), r in zip(run.logged, rows, strict=True):
        for key in ("loss", "lr", "wd", "momentum", "rankme", "feature_std"):
            assert scalars[f"train/{key}"] == pytest.approx(float(r[key]), rel=1e-6), key
    assert run.finished == 1


def test_a_resumed_run_continues_its_wandb_run_and_a_restart_from_scratch_starts_another(tmp_path, fake_wandb):
    data = write_idx(tmp_path / "data", n=48)
    out = tmp_path / "runs"
    first = config_mod.load(None, tiny_overrides(data, out, "r", **{"run.wandb": "offline", "optim.max_steps": 3}))
    Trainer(first).fit()  # a checkpoint at step 3
    Trainer(config_mod.load(None, tiny_overrides(data, out, "r", **{"run.wandb": "offline"})), resume=True).fit()
    assert fake_wandb[0].kwargs["id"] == fake_wandb[1].kwargs["id"]
    assert [s for s, _ in fake_wandb[1].logged] == [4, 5, 6]

    (out / "s").mkdir(parents=True)
    (out / "s" / WANDB_ID_FILE).write_text("old\n")  # left by a run killed before its first checkpoint
    Trainer(config_mod.load(None, tiny_overrides(data, out, "s", **{"run.wandb": "offline"})), resume=True).fit()
    new_id = fake_wandb[2].kwargs["id"]
    assert new_id not in ("old", fake_wandb[0].kwargs["id"])
    assert (out / "s" / WANDB_ID_FILE).read_text().strip() == new_id


def test_off_never_imports_wandb(tmp_path, no_wandb):
    data = write_idx(tmp_path / "data", n=16)
    Trainer(config_mod.load(None, tiny_overrides(data, tmp_path / "runs", "o"))).fit()  # run.wandb: off
    assert (tmp_path / "runs" / "o" / "metrics.csv").exists()


def test_wandb_asked_for_but_not_installed_fails_before_the_run_folder_is_made(tmp_path, no_wandb):
    data = write_idx(tmp_path / "data", n=16)
    cfg = config_mod.load(None, tiny_overrides(data, tmp_path / "runs", "m", **{"run.wandb": "online"}))
    with pytest.raises(
        config_mod.ConfigError, match=r"run\.wandb=online.*pip install 'ijepa_fast\[wandb\]'; or set run\.wandb=off"
    ):
        Trainer(cfg).fit()
    assert not (tmp_path / "runs" / "m").exists()


def test_an_unknown_wandb_mode_is_a_config_error_listing_the_choices():
    with pytest.raises(config_mod.ConfigError, match=r"run\.wandb='cloud'.*offline"):
        config_mod.load(None, ["run.wandb=cloud"])


def wandb_history(record_file: Path) -> list[dict]:
    """The history rows of a W&B run file (offline mode), read independently of W&B's sync code: a
    LevelDB-style log (a 7-byte ":W&B" header, 32 KiB blocks of chunks, each with a 7-byte header of
    CRC, length and type) of protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    block, data = 32768, record_file.read_bytes()
    assert data[:4] == b":W&B", f"{record_file} is not a W&B run file"
    pos, pending, rows = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4) and pending:  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item  # a key is in .key or, split at "/", in .nested_key
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return rows


@pytest.mark.skipif(not optional.available("wandb"), reason="wandb is not installed")
def test_a_real_offline_run_records_the_rows_of_metrics_csv_in_the_run_folder(tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = write_idx(tmp_path / "data", n=24)  # 3 steps
    Trainer(config_mod.load(None, tiny_overrides(data, tmp_path / "runs", "real", **{"run.wandb": "on"}))).fit()
    run_dir = tmp_path / "runs" / "real"
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    (record_file,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    history = wandb_history(record_file)
    rows = read_metrics(run_dir / "metrics.csv")
    assert [h["_step"] for h in history] == [int(r["step"]) for r in rows] == [1, 2, 3]
    for h, r in zip(history, rows, strict=True):
        assert h["train/loss"] == float(r["loss"]) and h["train/rankme"] == float(r["rankme"])


def test_a_wandb_id_file_that_is_a_link_is_refused_before_wandb_starts(tmp_path, monkeypatch):
    """The id file is written through no link: a planted one stops the logger before W&B starts, and
    the file it points at keeps its bytes."""
    from ijepa_fast.io.checkpoint import NotWritableError
    from ijepa_fast.train import metrics

    monkeypatch.setattr(metrics, "_start_wandb", lambda *a, **k: pytest.fail("W&B started"))
    victim = tmp_path / "victim.txt"
    victim.write_text("another user's file\n")
    (tmp_path / metrics.WANDB_ID_FILE).symlink_to(victim)
    for resumed in (False, True):
        with pytest.raises(NotWritableError, match="is a symbolic link"):
            metrics.WandbLogger(tmp_path, "offline", "r", {}, resumed=resumed)
    assert victim.read_text() == "another user's file\n"
