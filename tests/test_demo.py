"""``make demo`` end to end at toy size: pretrain a few steps, then the three-row probe/kNN table.

The images are separable by construction (class c is a bright horizontal band over rows 2c+4 to 2c+6),
so the raw-pixel row must score 100% with both classifiers: an independent check that the table
wires features, labels and test split together correctly.
"""

from __future__ import annotations

import json
import os
import re
import signal

import numpy as np
import pytest
import torch

from ijepa_fast.cli import demo
from tests.data_fixtures import write_idx_pair


def banded_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 40, (n, 28, 28))
    for i, c in enumerate(labels):
        images[i, 2 * c + 4 : 2 * c + 7] = 255
    return images.astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture
def banded_idx(tmp_path):
    root = tmp_path / "data"
    write_idx_pair(root, *banded_images(80, seed=0), split="train")
    write_idx_pair(root, *banded_images(40, seed=1), split="test")
    return root


def run_demo(data, out, *extra) -> int:
    return demo.main(
        [
            "--data",
            str(data),
            "--probe-train",
            "60",
            "--probe-test",
            "30",
            "--curve-train",
            "40",
            "--curve-test",
            "20",
            "optim.epochs=2",
            "data.batch_size=16",
            "data.num_workers=0",
            f"run.out_dir={out}",
            "run.checkpoint_every=1000",
            *extra,
        ]
    )


def table_rows(out: str, columns: int) -> dict[str, tuple[float, ...]]:
    cells = r" \| ".join([r"([\d.]+)"] * columns)
    return {
        m.group(1): tuple(map(float, m.groups()[1:])) for m in re.finditer(rf"^\| ([^|]+?) \| {cells} \|$", out, re.M)
    }


def test_demo_trains_and_prints_probe_knn_and_rank_for_three_feature_sets(banded_idx, tmp_path, capsys):
    assert run_demo(banded_idx, tmp_path / "runs") == 0
    out = capsys.readouterr().out
    rows = table_rows(out.split("frozen average-pooled features")[1], 3)  # the table after the curve
    assert list(rows) == ["I-JEPA (pretrained)", "same ViT, random init", "raw pixels"]
    assert rows["raw pixels"][:2] == (100.0, 100.0)
    assert all(1.0 <= rank <= 60 for _, _, rank in rows.values())  # RankMe lies in [1, min(N, D)]
    assert "first 60 training images, top-1 on the first 30 test images" in out
    (run_dir,) = (tmp_path / "runs").iterdir()
    report = json.loads((run_dir / "probe.json").read_text())
    assert (report["train_images"], report["test_images"]) == (60, 30)
    assert report["top1_percent"]["raw pixels"] == {"linear_probe": 100.0, "knn": 100.0}
    for name, (probe, knn, rank) in rows.items():
        assert report["top1_percent"][name] == pytest.approx({"linear_probe": probe, "knn": knn}, abs=0.05)
        assert report["rankme"][name] == pytest.approx(rank, abs=0.005)
    assert (run_dir / "metrics.csv").is_file() and (run_dir / "loss.png").is_file()
    gain = re.search(
        r"^pretraining vs random init: linear probe ([-+][\d.]+) points, kNN ([-+][\d.]+) points", out, re.M
    )
    pre, rnd = (report["top1_percent"][name] for name in ("I-JEPA (pretrained)", "same ViT, random init"))
    assert float(gain.group(1)) == pytest.approx(pre["linear_probe"] - rnd["linear_probe"], abs=0.051)
    assert float(gain.group(2)) == pytest.approx(pre["knn"] - rnd["knn"], abs=0.051)


def test_the_curve_has_one_point_per_epoch_and_its_last_is_the_final_target_encoder(banded_idx, tmp_path, capsys):
    """The last point, re-scored here from the final checkpoint's target encoder, must match: the
    trainer called back after the last epoch with the encoder it saved. Epoch 0 is the initialisation."""
    from ijepa_fast.data.evaluation import build_eval_dataset
    from ijepa_fast.io.load import load_encoder

    assert run_demo(banded_idx, tmp_path / "runs") == 0
    out = capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "epoch 0: random init; first 40 training / 20 test images" in out
    assert f"plot: {run_dir / 'probe_curve.png'}" in out
    assert (run_dir / "probe_curve.png").stat().st_size > 0
    assert "| epoch | 0 | 1 | 2 |" in out
    curve = json.loads((run_dir / "probe_curve.json").read_text())
    assert (curve["train_images"], curve["test_images"]) == (40, 20)
    assert list(curve["epochs"]) == ["0", "1", "2"]
    knn_row = re.search(r"^\| kNN % \| (.+) \|$", out, re.M).group(1)
    assert [float(v) for v in knn_row.split(" | ")] == pytest.approx(
        [curve["epochs"][e]["knn"] for e in "012"], abs=0.05
    )

    cfg = demo.demo_config(demo.parse_args(["--data", str(banded_idx)]))
    encoder = load_encoder(run_dir / "checkpoints" / "latest.pt").encoder
    features = demo.encoder_features(encoder, "final", progress=False)
    subset = [build_eval_dataset(cfg.data, split, limit=n) for split, n in (("train", 40), ("test", 20))]
    final = demo.score(features(subset[0], "train"), features(subset[1], "test"))
    assert curve["epochs"]["2"] == pytest.approx(vars(final), abs=1e-6)
    features = demo.encoder_features(demo.initial_encoder(cfg), "init", progress=False)
    initial = demo.score(features(subset[0], "train"), features(subset[1], "test"))
    assert curve["epochs"]["0"] == pytest.approx(vars(initial), abs=1e-6)


def test_the_random_init_row_is_the_trainers_initial_target_encoder(banded_idx, tmp_path):
    from ijepa_fast.train.trainer import Trainer

    cfg = demo.demo_config(
        demo.parse_args(["--data", str(banded_idx), f"run.out_dir={tmp_path}", "data.batch_size=16"])
    )
    trainer = Trainer(cfg)
    try:
        built = trainer.engine.target_encoder.state_dict()
    finally:
        trainer.close()
    ours = demo.initial_encoder(cfg).state_dict()
    assert list(ours) == list(built)
    assert all(torch.equal(ours[k], built[k]) for k in ours)


@pytest.mark.parametrize("count", ["1", "0", "-5"])
def test_demo_refuses_a_probe_smaller_than_two_images(count, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--probe-train", count])
    assert "need at least 2 images" in capsys.readouterr().err


@pytest.mark.parametrize("count", ["1", "-1"])
def test_a_curve_of_too_few_images_is_refused_naming_both_ways_out(count, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--curve-train", count])
    assert f"{count}: need at least 2 images, or 0 for no curve" in capsys.readouterr().err
    assert demo.parse_args(["--curve-train", "0"]).curve_train == 0


def quick_demo(data, out, *extra) -> int:
    """The demo at its smallest: one epoch of 5 steps, no curve, a small probe."""
    return demo.main(
        [
            "--data",
            str(data),
            "--probe-train",
            "20",
            "--probe-test",
            "10",
            "--curve-train",
            "0",
            "optim.epochs=1",
            "data.batch_size=16",
            "data.num_workers=0",
            f"run.out_dir={out}",
            "run.checkpoint_every=1000",
            "run.progress=false",
            *extra,
        ]
    )


def test_overrides_may_come_before_and_after_the_options():
    args = demo.parse_args(["optim.epochs=2", "--data", "d", "data.batch_size=16", "--probe-train", "30", "run.seed=3"])
    assert args.data == "d" and args.probe_train == 30
    assert args.overrides == ["optim.epochs=2", "data.batch_size=16", "run.seed=3"]
    cfg = demo.demo_config(args)
    assert (cfg.optim.epochs, cfg.data.batch_size, cfg.run.seed, cfg.data.root) == (2, 16, 3, "d")


def test_a_demo_started_in_the_same_second_as_a_running_one_gets_its_own_run_folder(
    banded_idx, tmp_path, monkeypatch, capsys
):
    from ijepa_fast.train.run_folder import RunLock

    monkeypatch.setattr(demo.time, "strftime", lambda *args: "20260101-120000")  # a frozen clock
    out = tmp_path / "runs"
    first = out / "demo-20260101-120000"
    first.mkdir(parents=True)
    lock = RunLock(first)
    lock.acquire()  # the first demo, still training
    try:
        assert quick_demo(banded_idx, out) == 0
    finally:
        lock.release()
    assert sorted(p.name for p in out.iterdir()) == [first.name, f"{first.name}-2"]
    assert (out / f"{first.name}-2" / "probe.json").is_file() and not (first / "checkpoints").exists()
    assert f"run folder {out / first.name}-2" in capsys.readouterr().out


def test_a_run_name_given_on_the_command_line_is_kept(tmp_path):
    cfg = demo.demo_config(demo.parse_args([f"run.out_dir={tmp_path}", "run.name=mine"]))
    (tmp_path / "mine").mkdir()  # a folder of that name already: a default name would become mine-2
    assert demo.claim_run_folder(cfg, demo.parse_args(["run.name=mine"])).run.name == "mine"
    assert not (tmp_path / "mine-2").exists()
    cfg = demo.demo_config(demo.parse_args([f"run.out_dir={tmp_path}"]))
    first, second = (demo.claim_run_folder(cfg, demo.parse_args([])).run.name for _ in range(2))
    assert (first, second) == (cfg.run.name, f"{cfg.run.name}-2")
    assert (tmp_path / first).is_dir() and (tmp_path / second).is_dir()


def test_a_folder_too_small_for_the_probe_is_refused_before_training(tmp_path, capsys):
    from ijepa_fast.data.synthetic import write_jpeg_folder

    write_jpeg_folder(tmp_path / "one", 1, size=(32, 32))
    rc = quick_demo(tmp_path / "one", tmp_path / "runs", "--dataset", "folder", "data.batch_size=1")  # trains
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0] == (
        f"ijepa-demo: {tmp_path / 'one'}: 1 training image; the probe needs at least 2 "
        "(one is held out to choose its learning rate and weight decay)"
    )
    assert not (tmp_path / "runs").exists()  # nothing trained, no run folder


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_per_epoch_evaluation_stops_the_demo_after_saving(
    signum, banded_idx, tmp_path, monkeypatch, capsys
):
    """The trainer's stop: it finishes the step, saves and the demo exits 128 + the signal, with no probe."""
    add = demo.ProbeCurve.add

    def add_then_signal(curve, epoch, encoder):
        add(curve, epoch, encoder)
        if epoch == 1:
            os.kill(os.getpid(), signum)  # as a scheduler would, while the curve is scored

    monkeypatch.setattr(demo.ProbeCurve, "add", add_then_signal)
    assert run_demo(banded_idx, tmp_path / "runs") == 128 + signum  # 2 epochs of 5 steps asked for
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert [p.name for p in (run_dir / "checkpoints").glob("ckpt-*.pt")] == ["ckpt-00000005.pt"]
    assert not (run_dir / "probe.json").exists() and not (run_dir / "probe_curve.json").exists()
    captured = capsys.readouterr()
    assert "frozen average-pooled features" not in captured.out
    assert f"stopped by {signal.Signals(signum).name} at step 5" in captured.err
