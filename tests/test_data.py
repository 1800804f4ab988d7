"""CPU data path: IDX and folder readers, bad files skipped and counted, crops, resume, sharding."""
from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ijepa_fast.config import DataConfig
from ijepa_fast.data.folder import load_rgb, scan_folder
from ijepa_fast.data.idx import IdxDataset, read_idx
from ijepa_fast.data.loader import StepBatchSampler, build_eval_dataset, build_pretrain_loader, check_data_source
from ijepa_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, crop_box, to_normalized_tensor

MASKS = dict(num_pred_masks=4, min_keep=2)


def photo(w=64, h=48, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def make_folder_with_bad_files(root: Path) -> int:
    """Good images in two classes plus every awkward kind; returns how many are undecodable (3)."""
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    for i in range(6):
        Image.fromarray(photo(seed=i)).save(root / ("cats" if i % 2 else "dogs") / f"good{i}.jpg")
    Image.fromarray(photo(seed=10)).convert("CMYK").save(root / "cats" / "cmyk.jpg")
    Image.fromarray(photo(seed=11)).convert("RGBA").save(root / "cats" / "rgba.png")
    Image.fromarray((photo(seed=12)[..., 0].astype(np.uint16) * 257)).save(root / "dogs" / "deep16.png")
    Image.fromarray(photo(seed=13)).convert("L").save(root / "dogs" / "gray.jpg")
    Image.fromarray(photo(seed=14)).convert("P").save(root / "dogs" / "palette.png")
    buf = io.BytesIO()
    Image.fromarray(photo(seed=15)).save(buf, format="JPEG")
    (root / "cats" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "dogs" / "empty.jpg").write_bytes(b"")
    (root / "dogs" / "notes.jpg").write_text("this is not an image")
    return 3


def write_idx_pair(root: Path, n: int, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with opener(root / f"train-images-idx3-ubyte{suffix}", "wb") as fh:
        fh.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
    with opener(root / f"train-labels-idx1-ubyte{suffix}", "wb") as fh:
        fh.write(struct.pack(">II", 0x801, n) + labels.tobytes())
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    images, labels = write_idx_pair(tmp_path, 5, gz)
    ds = IdxDataset(tmp_path, "train")
    assert len(ds) == 5 and np.array_equal(ds.images, images) and ds[3][1] == labels[3]


def test_bad_idx_is_named(tmp_path):
    (tmp_path / "x").write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "x")
    (tmp_path / "y").write_bytes(struct.pack(">II", 0x801, 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "y")


def test_awkward_modes_become_rgb(tmp_path):
    make_folder_with_bad_files(tmp_path)
    for name in ("cats/cmyk.jpg", "cats/rgba.png", "dogs/deep16.png", "dogs/gray.jpg", "dogs/palette.png"):
        img = load_rgb(tmp_path / name)
        assert img.mode == "RGB" and img.size == (64, 48)
    deep = np.asarray(load_rgb(tmp_path / "dogs/deep16.png"))
    assert 0 < deep.mean() < 250  # scaled from 16 bits, not clipped to white
    for name in ("cats/truncated.jpg", "dogs/empty.jpg", "dogs/notes.jpg"):
        with pytest.raises((OSError, ValueError, SyntaxError)):
            load_rgb(tmp_path / name)


def test_folder_scan_labels_from_subfolders(tmp_path):
    make_folder_with_bad_files(tmp_path)
    paths, labels, classes = scan_folder(tmp_path)
    assert classes == ["cats", "dogs"] and len(paths) == 14
    assert all(lab == (0 if p.parent.name == "cats" else 1) for p, lab in zip(paths, labels))


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_skipped_and_counted(tmp_path, workers):
    bad = make_folder_with_bad_files(tmp_path / "data")
    cfg = DataConfig(dataset="folder", root=str(tmp_path / "data"), split="", crop_size=32, batch_size=14,
                     num_workers=workers, pin_memory=False)
    loader = build_pretrain_loader(cfg, grid=4, mask_kwargs=MASKS, seed=0)
    batch = next(iter(loader))  # one batch = the whole epoch
    assert batch.images.shape == (14, 3, 32, 32) and batch.images.dtype == torch.float32
    assert torch.isfinite(batch.images).all()
    assert batch.skipped == bad and loader.skipped == bad
    assert {p.split(" ")[0].rsplit("/", 1)[-1] for p in loader.skipped_paths} <= {"truncated.jpg", "empty.jpg",
                                                                                  "notes.jpg"}


def test_crop_area_within_bounds():
    import random

    rng = random.Random(0)
    fracs = [w * h / (400 * 300) for _, _, w, h in (crop_box(400, 300, (0.3, 1.0), (3 / 4, 4 / 3), rng)
                                                    for _ in range(2000))]
    assert min(fracs) >= 0.3 - 0.01 and max(fracs) <= 1.0
    # both ends of the range occur (large crops at extreme aspect ratios do not fit and are redrawn)
    assert min(fracs) < 0.35 and max(fracs) > 0.95


def test_normalisation():
    x = to_normalized_tensor(Image.new("RGB", (4, 4), (255, 128, 0)))
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 128, 0), IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(x[:, 0, 0], torch.tensor(expected))


def idx_cfg(root, **kw):
    return DataConfig(**{"dataset": "idx", "root": str(root), "crop_size": 28, "batch_size": 8, "num_workers": 0,
                         "pin_memory": False, **kw})


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_reproduces_batches_bitwise(tmp_path, workers):
    write_idx_pair(tmp_path, 40)
    cfg = idx_cfg(tmp_path, num_workers=workers)
    full = [b for b, _ in zip(build_pretrain_loader(cfg, grid=4, mask_kwargs=MASKS, seed=3), range(9))]
    resumed = [b for b, _ in zip(build_pretrain_loader(cfg, grid=4, mask_kwargs=MASKS, seed=3, start_step=4),
                                 range(5))]
    for a, b in zip(full[4:], resumed):
        assert a.step == b.step and a.epoch == b.epoch
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.masks.context, b.masks.context) and torch.equal(a.masks.targets, b.masks.targets)
    assert full[5].epoch == 1  # 40 images / batch 8 = 5 steps per epoch: step 5 starts epoch 1


def test_two_ranks_cover_every_sample_once_per_epoch():
    seen = []
    for rank in (0, 1):
        sampler = StepBatchSampler(48, 6, seed=1, rank=rank, world_size=2)
        it = iter(sampler)
        for _ in range(sampler.steps_per_epoch):
            seen += [i for i, _, e in next(it) if e == 0]
    assert sorted(seen) == list(range(48))


def test_missing_or_empty_data_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_data_source(DataConfig(dataset="folder", root=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        check_data_source(DataConfig(dataset="folder", root=str(tmp_path / "empty"), split=""))
    with pytest.raises(FileNotFoundError, match="no IDX file"):
        check_data_source(DataConfig(dataset="idx", root=str(tmp_path / "empty")))


def test_eval_dataset_centre_crops(tmp_path):
    images, labels = write_idx_pair(tmp_path, 6)
    ds = build_eval_dataset(idx_cfg(tmp_path), split="train")
    x, y = ds[2]
    assert x.shape == (3, 28, 28) and y == labels[2]
    gray = (torch.from_numpy(images[2]).float() / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    torch.testing.assert_close(x[0], gray)
