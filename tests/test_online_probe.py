"""The online probe: its scores in metrics.csv, TensorBoard and a curve, its time out of images/s, rank
0 only, separable labels scored 100%, webdataset shards with .cls labels, and its config's checks."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ijepa_fast import config as config_mod
from ijepa_fast.data.shards import LabelledShards
from ijepa_fast.models.vit import build_encoder
from ijepa_fast.train import online_probe
from ijepa_fast.train.metrics import read_metrics
from ijepa_fast.train.trainer import Trainer
from tests.test_finetune import write_separable
from tests.test_trainer import tiny_overrides, write_idx

PROBE = {"online_probe.train_images": 32, "online_probe.test_images": 16, "online_probe.k": 5}


def probe_overrides(data: Path, out: Path, name: str, **extra) -> list[str]:
    values = {
        **PROBE,
        "online_probe.every": 1,
        "online_probe.root": str(data),
        "online_probe.test_split": "train",  # write_idx writes the train split only
        "online_probe.linear_steps": 20,
        "run.log_every": 4,
        "run.tensorboard": "true",
        **extra,
    }
    return tiny_overrides(data, out, name, **values)


def test_scores_land_in_metrics_tensorboard_and_a_curve_every_epoch(tmp_path):
    data = write_idx(tmp_path / "data", n=16)  # 2 steps of 8 per epoch
    extra = {"optim.epochs": 2, "run.log_every": 3}
    assert Trainer(config_mod.load(None, probe_overrides(data, tmp_path / "runs", "p", **extra))).fit().steps == 4
    run = tmp_path / "runs" / "p"
    rows = {int(r["step"]): r for r in read_metrics(run / "metrics.csv")}
    assert sorted(rows) == [2, 3, 4]  # each epoch's end is logged although log_every is 3
    assert [s for s, r in rows.items() if r["probe_knn_top1"]] == [2, 4]
    for s in (2, 4):
        assert 0 <= float(rows[s]["probe_knn_top1"]) <= 100 and 0 <= float(rows[s]["probe_linear_top1"]) <= 100
        assert rows[s]["loss"]  # the step's own row: the loss beside the scores
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/probe_knn_top1")] == [2, 4]
    assert (run / online_probe.PLOT_NAME).stat().st_size > 0


def test_the_probe_time_stays_out_of_images_per_second(tmp_path, monkeypatch):
    """A probe that takes 1000 s (of a clock it advances) after each 8-image step: images/s counts the
    step alone (with the probe it would be below 8 / 1000)."""
    data = write_idx(tmp_path / "data", n=16)
    offset, real = [0.0], time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real() + offset[0])

    def slow_score(*args):
        offset[0] += 1000.0
        return {"probe_knn_top1": 50.0}

    monkeypatch.setattr(online_probe, "score", slow_score)
    extra = {"online_probe.unit": "steps", "run.log_every": 1, "optim.max_steps": 2, "run.tensorboard": "false"}
    assert Trainer(config_mod.load(None, probe_overrides(data, tmp_path / "runs", "t", **extra))).fit().steps == 2
    rows = read_metrics(tmp_path / "runs" / "t" / "metrics.csv")
    assert [r["probe_knn_top1"] for r in rows] == ["50.0", "50.0"] and offset[0] == 2000.0
    assert all(float(r["images_per_s"]) > 8 / 100 for r in rows), rows  # a step under 100 s


def test_only_rank_0_scores(tmp_path, monkeypatch):
    """Another rank neither opens the probe's data nor scores: it returns no scores and goes on to its
    next step, whose first collective waits for rank 0 (the module docstring)."""
    cfg = config_mod.load(None, probe_overrides(tmp_path / "missing", tmp_path / "runs", "r"))
    monkeypatch.setattr(online_probe, "score", lambda *args: pytest.fail("rank 1 scored"))
    probe = online_probe.OnlineProbe(cfg, steps_per_epoch=6, run_dir=tmp_path, is_main=False)
    probe.check_data()  # the data does not exist: only rank 0 would find out
    assert probe.due(6) and not probe.due(5) and probe(6, build_encoder("vit_tiny", 28, 7, depth=1)) == {}


def test_separable_labels_score_100_percent_with_knn_and_the_linear_probe(tmp_path):
    write_separable(tmp_path / "data")
    cfg = config_mod.load(
        None,
        probe_overrides(
            tmp_path / "data",
            tmp_path / "runs",
            "s",
            **{"data.crop_size": 16, "model.patch_size": 8, "online_probe.linear_steps": 300},
        ),
    )
    train = online_probe.open_split(cfg, "train", 64)
    test = online_probe.open_split(cfg, "test", 32)
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny", img_size=16, patch_size=8, depth=1)  # random: grey levels still separate
    scores = online_probe.score(encoder, train, test, cfg.online_probe)
    assert scores == {"probe_knn_top1": 100.0, "probe_linear_top1": 100.0}


def _write_shard(path: Path, samples: list[tuple[str, int, int]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, level, label in samples:
            png = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), level, np.uint8)).save(png, format="PNG")
            for name, payload in ((f"{key}.png", png.getvalue()), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_labelled_shards_read_each_image_with_its_cls(tmp_path):
    _write_shard(tmp_path / "b.tar", [("s2", 200, 3)])
    _write_shard(tmp_path / "a.tar", [("s0", 10, 1), ("s1", 100, 0)])
    shards = LabelledShards(tmp_path)
    assert len(shards) == 3 and shards.labels.tolist() == [1, 0, 3]  # a.tar before b.tar
    image, label = shards[2]
    assert label == 3 and image.mode == "RGB" and np.asarray(image)[0, 0].tolist() == [200, 200, 200]
    cfg = config_mod.load(
        None,
        tiny_overrides(
            tmp_path, tmp_path / "runs", "w",
            **{"online_probe.dataset": "shards", "online_probe.root": str(tmp_path), "online_probe.train_split": ""},
        ),
    )  # fmt: skip
    images = online_probe.open_split(cfg, "", 2)
    assert len(images) == 2 and images[0][0].shape == (3, 28, 28) and images[1][1] == 0


@pytest.mark.parametrize(
    "override,message",
    [
        ("online_probe.every=-1", "online_probe.every=-1 is invalid"),
        ("online_probe.unit=hours", "online_probe.unit='hours' is invalid"),
        ("online_probe.k=9999", "online_probe.k=9999 is invalid"),
        ("online_probe.dataset=csv", "online_probe.dataset='csv' is invalid"),
    ],
)
def test_bad_probe_settings_are_one_line_errors(override, message):
    with pytest.raises(config_mod.ConfigError, match=message):
        config_mod.load(None, [override])


def test_probe_settings_may_change_on_resume():
    assert {"online_probe.every", "online_probe.root"} <= set(config_mod.RESUME_MAY_CHANGE)


def test_a_missing_probe_root_is_named_by_its_key_before_training(tmp_path):
    data = write_idx(tmp_path / "data", n=48)
    cfg = config_mod.load(None, probe_overrides(data, tmp_path / "runs", "p", **{"online_probe.root": tmp_path / "no"}))
    with pytest.raises(FileNotFoundError, match=f"online_probe.root={tmp_path / 'no'} does not exist"):
        Trainer(cfg)
    assert not list((tmp_path / "runs").rglob("*.pt"))
