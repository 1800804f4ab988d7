"""``make demo`` end to end at toy size: pretrain a few steps, then the three-row probe/kNN table.

The images are separable by construction (class c is a bright horizontal band over rows 2c+4 to 2c+6),
so the raw-pixel row must score 100% with both classifiers: an independent check that the table
wires features, labels and test split together correctly.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ijepa_fast import demo
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


def test_demo_trains_and_prints_probe_and_knn_for_three_feature_sets(banded_idx, tmp_path, capsys):
    status = demo.main(
        [
            "--data",
            str(banded_idx),
            "--probe-train",
            "60",
            "--probe-test",
            "30",
            "optim.epochs=1",
            "data.batch_size=16",
            "data.num_workers=0",
            f"run.out_dir={tmp_path / 'runs'}",
            "run.checkpoint_every=1000",
        ]
    )
    assert status == 0
    out = capsys.readouterr().out
    rows = dict(
        (m.group(1), (float(m.group(2)), float(m.group(3))))
        for m in re.finditer(r"^\| ([^|]+?) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)
    )
    assert list(rows) == ["I-JEPA (pretrained)", "same ViT, random init", "raw pixels"]
    assert rows["raw pixels"] == (100.0, 100.0)
    assert "first 60 training images, top-1 on the first 30 test images" in out
    (run_dir,) = (tmp_path / "runs").iterdir()
    report = json.loads((run_dir / "probe.json").read_text())
    assert (report["train_images"], report["test_images"]) == (60, 30)
    assert report["top1_percent"]["raw pixels"] == {"linear_probe": 100.0, "knn": 100.0}
    for name, (probe, knn) in rows.items():
        assert report["top1_percent"][name] == pytest.approx({"linear_probe": probe, "knn": knn}, abs=0.05)
    assert (run_dir / "metrics.csv").is_file() and (run_dir / "loss.png").is_file()


@pytest.mark.parametrize("count", ["1", "0", "-5"])
def test_demo_refuses_a_probe_smaller_than_two_images(count, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--probe-train", count])
    assert "need at least 2 images" in capsys.readouterr().err
