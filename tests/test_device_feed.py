"""speed.uint8_input: the loader hands uint8 images, ``DeviceFeed`` normalises them on the device, and
the floats are the loader's own normalised floats bit for bit; on CUDA the copy runs one batch ahead
on a side stream (the GPU-marked test, and the gpu-check ablation row)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from ijepa_fast import config as config_mod
from ijepa_fast.config import DataConfig
from ijepa_fast.data.device_feed import DeviceFeed
from ijepa_fast.data.loader import build_pretrain_loader
from ijepa_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ijepa_fast.train.trainer import Trainer
from tests.test_trainer import losses, tiny_overrides, write_idx

MASKS = dict(num_pred_masks=2, pred_scale=(0.15, 0.2), enc_scale=(0.85, 1.0), aspect_ratio=(0.75, 1.5), min_keep=2)


def _rgb_folder(root, n: int = 12):
    """Random RGB images of odd sizes in two class folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = 30 + i, 41 - i
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _loader(data, dataset: str, crop: int, uint8: bool, batches: int = 3):
    cfg = DataConfig(dataset=dataset, root=str(data), crop_size=crop, batch_size=5, num_workers=0, pin_memory=False)
    loader = build_pretrain_loader(cfg, grid=crop // 7, mask_kwargs=MASKS, seed=3, uint8=uint8)
    return list(itertools.islice(iter(loader), batches))


def _reference64(raw: torch.Tensor) -> torch.Tensor:
    """(x / 255 - mean) / std in float64, one channel repeated to three."""
    x = raw.double().expand(raw.shape[0], 3, *raw.shape[2:]) / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN).double(), torch.tensor(IMAGENET_STD).double()
    return (x - mean.view(3, 1, 1)) / std.view(3, 1, 1)


@pytest.mark.parametrize("dataset", ["idx", "folder"])
def test_uint8_batches_normalised_by_the_feed_are_the_loaders_floats_bit_for_bit(tmp_path, dataset):
    data = write_idx(tmp_path / "d", n=20) if dataset == "idx" else _rgb_folder(tmp_path / "d")
    floats, raw = _loader(data, dataset, 28, uint8=False), _loader(data, dataset, 28, uint8=True)
    fed = list(DeviceFeed(raw, torch.device("cpu")))
    assert len(fed) == len(floats) == 3
    for f, r, u in zip(floats, fed, raw):
        assert u.images.dtype == torch.uint8 and u.images.shape[1] == (1 if dataset == "idx" else 3)
        assert r.images.dtype == torch.float32 and r.images.shape == f.images.shape == (5, 3, 28, 28)
        assert torch.equal(r.images.view(torch.int32), f.images.view(torch.int32))
        assert torch.equal(r.labels, f.labels) and torch.equal(r.masks.targets, f.masks.targets)
        torch.testing.assert_close(r.images.double(), _reference64(u.images), rtol=0, atol=2e-6)


def test_a_run_with_uint8_input_trains_like_one_with_float_input_bit_for_bit(tmp_path):
    data = write_idx(tmp_path / "data", n=32)
    got = {}
    for uint8 in ("true", "false"):
        extra = {"speed.uint8_input": uint8, "optim.max_steps": 2}
        cfg = config_mod.load(None, tiny_overrides(data, tmp_path / "runs", f"u{uint8}", **extra))
        Trainer(cfg).fit()
        got[uint8] = losses(tmp_path / "runs" / f"u{uint8}")
    assert got["true"] == got["false"] and len(got["true"]) == 2


@pytest.mark.gpu
def test_on_cuda_the_feed_stages_one_batch_ahead_on_a_side_stream_and_matches_the_cpu_floats(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    data = write_idx(tmp_path / "d", n=20)
    floats, raw = _loader(data, "idx", 28, uint8=False), _loader(data, "idx", 28, uint8=True)
    pulled = []

    def host():
        for b in raw:
            pulled.append(b.step)
            yield b.pin_memory()

    feed = iter(DeviceFeed(host(), torch.device("cuda")))
    first = next(feed)
    assert len(pulled) == 2  # batch 1 was queued on the side stream before batch 0 was handed out
    fed = [first, *feed]
    for f, r in zip(floats, fed):
        assert r.images.is_cuda and r.masks.context.is_cuda
        assert torch.equal(r.images.cpu().view(torch.int32), f.images.view(torch.int32))
