"""CPU data path: IDX and folder readers, every image mode to RGB, bad files skipped and counted
(with and without workers), crop statistics, normalisation, determinism, bitwise resume, sharding,
clear errors for missing or empty sources, and the loader benchmark at a tiny size."""

from __future__ import annotations

import errno
import gzip
import logging
import math
import os
import random
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from ijepa_fast.config import DataConfig
from ijepa_fast.data.errors import DataSourceError
from ijepa_fast.data.evaluation import build_eval_dataset
from ijepa_fast.data.folder import ImageFolderDataset, load_rgb, scan_folder
from ijepa_fast.data.idx import IdxDataset, IdxFormatError, read_idx, read_idx_header, write_idx
from ijepa_fast.data.loader import StepBatchSampler, build_pretrain_loader
from ijepa_fast.data.sources import check_data_source
from ijepa_fast.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_box,
    center_crop_eval,
    crop_box,
    normalize,
    pil_to_uint8,
    random_resized_crop,
    to_normalized_tensor,
)
from ijepa_fast.masks.sampler import check_masks
from ijepa_fast.runtime.rng import crop_rng
from tests.data_fixtures import (
    encode,
    idx_bytes,
    make_planted_folder,
    random_idx_pair,
    synthetic_photo,
    write_idx_pair,
)

MASKS = dict(num_pred_masks=4, min_keep=4)
FMNIST = "/usr/share/datasets/fashion-mnist"


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert (a.step, a.epoch, a.skipped, a.bad_paths) == (b.step, b.epoch, b.skipped, b.bad_paths)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.masks.context, b.masks.context) and torch.equal(a.masks.targets, b.masks.targets)


def idx_cfg(root, **kw) -> DataConfig:
    base = dict(dataset="idx", root=str(root), crop_size=28, batch_size=8, num_workers=0, pin_memory=False)
    return DataConfig(**{**base, **kw})


def folder_cfg(root, **kw) -> DataConfig:
    base = dict(dataset="folder", root=str(root), split="", crop_size=32, batch_size=4, num_workers=0, pin_memory=False)
    return DataConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    images, labels = random_idx_pair(tmp_path, 5, gz=gz)
    ds = IdxDataset(tmp_path, "train")
    assert ds.images.dtype == np.uint8 and ds.images.shape == (5, 28, 28) and ds.labels.dtype == np.int64
    assert len(ds) == 5 and np.array_equal(ds.images, images) and np.array_equal(ds.labels, labels)
    img, label = ds[3]
    assert np.array_equal(img, images[3]) and label == labels[3]


def test_idx_gzip_is_detected_by_content_and_test_split(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(gzip.compress(idx_bytes(images)))  # gzip without .gz
    (tmp_path / "t10k-labels.idx1-ubyte").write_bytes(idx_bytes(np.array([7, 1], np.uint8)))  # mirror spelling
    ds = IdxDataset(tmp_path, "test")
    assert np.array_equal(ds.images, images) and ds.labels.tolist() == [7, 1]
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        IdxDataset(tmp_path, "train")
    with pytest.raises(ValueError, match="'train' or 'test'"):
        IdxDataset(tmp_path, "val")


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_idx_writer_round_trip(tmp_path, dtype):
    array = (np.arange(24) - 5).reshape(2, 3, 4).astype(dtype)
    write_idx(tmp_path / "a.gz", array)
    back = read_idx(tmp_path / "a.gz")
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, array)
    assert read_idx_header(tmp_path / "a.gz")[1] == (2, 3, 4)


def test_bad_idx_files_are_named(tmp_path):
    cases = {
        "magic": b"\x12\x34\x08\x01" + b"\x00" * 8,
        "empty": b"",
        "header": b"\x00\x00\x08\x03\x00\x00",  # three dims announced, one and a half present
        "body": struct.pack(">II", 0x801, 10) + b"\x00" * 3,
        "padded": struct.pack(">II", 0x801, 2) + b"\x00" * 3,
        "gzip": gzip.compress(idx_bytes(np.random.default_rng(0).integers(0, 256, (50, 4, 4), np.uint8)))[:400],
    }
    expect = {
        "magic": "bad magic number",
        "empty": "empty file",
        "header": "truncated header",
        "body": "is truncated",
        "padded": "longer than its header",
        "gzip": "truncated gzip",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(IdxFormatError, match=expect[name]) as err:
            read_idx(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)


def test_idx_images_must_be_uint8_images(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 5), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(IdxFormatError, match=r"expected uint8 images \[N, H, W\]"):
        IdxDataset(tmp_path)


@pytest.mark.skipif(not os.path.isfile(f"{FMNIST}/t10k-images-idx3-ubyte.gz"), reason="Fashion-MNIST not installed")
def test_installed_fashion_mnist_reads():
    ds = IdxDataset(FMNIST, "test")
    assert ds.images.shape == (10000, 28, 28) and sorted(set(ds.labels.tolist())) == list(range(10))
    check_data_source(DataConfig(dataset="idx", root=FMNIST, split="train"))


# ----------------------------------------------------------------------------- folders and decoding


def test_folder_scan_labels_order_and_extensions(tmp_path):
    planted = make_planted_folder(tmp_path)
    (tmp_path / "dogs" / "readme.txt").write_text("not an image")
    (tmp_path / "cats" / "archive.tar").write_bytes(b"")
    paths, labels, classes = scan_folder(tmp_path)
    rel = [p.relative_to(tmp_path).as_posix() for p in paths]
    assert classes == ["cats", "dogs"] and sorted(rel) == sorted(planted.good + planted.awkward + planted.bad)
    assert rel == sorted(rel, key=lambda r: r.split("/")) and "cats/deep/nested/UPPER.JPG" in rel
    assert labels == [0 if r.startswith("cats/") else 1 for r in rel]
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == planted.n_files and ds.describe(0) == str(paths[0]) and ds.labels.tolist() == labels


def test_unusual_file_names_survive_the_path_table(tmp_path):
    names = ["caf\u00e9 \u732b.jpg", os.fsdecode(b"raw-\xff-bytes.png")]  # non-ASCII, and not UTF-8 at all
    for i, name in enumerate(names):
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / name).write_bytes(encode(synthetic_photo(seed=i), "PNG"))
    ds = ImageFolderDataset(tmp_path)
    assert sorted(os.path.basename(ds.describe(i)) for i in range(2)) == sorted(names)
    assert all(ds[i][0].mode == "RGB" for i in range(2))


def test_flat_folder_is_one_class_and_loose_images_are_left_out_loudly(tmp_path, caplog):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(encode(synthetic_photo(seed=i), "PNG"))
    assert scan_folder(tmp_path)[1:] == ([0, 0, 0], [])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.jpg").write_bytes(encode(synthetic_photo()))
    with caplog.at_level(logging.WARNING):
        paths, labels, classes = scan_folder(tmp_path)
    assert [p.name for p in paths] == ["x.jpg"] and labels == [0] and classes == ["b"]
    assert "3 image(s) lie directly in the root" in caplog.text


def test_an_unreadable_class_folder_is_named_not_dropped_silently(tmp_path, monkeypatch, caplog):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.jpg").write_bytes(encode(synthetic_photo()))
    real_scandir = os.scandir

    def scandir(path="."):  # the OS refuses to list b/ (as chmod 000 would for a user other than root)
        if os.path.basename(os.fspath(path)) == "b":
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING):
        paths, labels, classes = scan_folder(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["a/x.jpg", "c/x.jpg"]
    assert classes == ["a", "c"] and labels == [0, 1]
    assert f"1 folder(s) could not be read and are left out: {tmp_path / 'b'} (Permission denied)" in caplog.text


def test_folder_scan_survives_a_link_cycle(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(encode(synthetic_photo()))
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    paths, _, _ = scan_folder(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["a/x.jpg"]


def test_awkward_modes_become_rgb_correctly(tmp_path):
    planted = make_planted_folder(tmp_path)
    for rel in planted.good + planted.awkward:
        img = load_rgb(tmp_path / rel)
        assert img.mode == "RGB" and img.size == (64, 48), rel
    # 16-bit: v * 257 on 16 bits comes back as v (scaled, not clipped to white)
    deep = np.asarray(load_rgb(tmp_path / "dogs/deep16.png"))
    assert np.array_equal(deep[..., 0], synthetic_photo(seed=14)[..., 0]) and (deep[..., 0] == deep[..., 2]).all()
    gray = np.asarray(load_rgb(tmp_path / "dogs/gray.jpg"))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    cmyk = np.asarray(load_rgb(tmp_path / "cats/cmyk.jpg")).astype(float)
    assert np.abs(cmyk - synthetic_photo(seed=10)).mean() < 12  # lossy, but the colours survive


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: kept
    rgba[0, 1] = (10, 20, 30, 0)  # transparent: white
    rgba[0, 2] = (0, 0, 0, 128)  # half black over white: grey
    (tmp_path / "a.png").write_bytes(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    out = np.asarray(load_rgb(tmp_path / "a.png")).astype(int)
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [255, 255, 255]
    assert abs(out[0, 2] - 127).max() <= 1
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    pal.putpalette([5, 6, 7, 50, 60, 70] + [0] * 762)
    (tmp_path / "p.png").write_bytes(encode(pal, "PNG", transparency=0))
    assert np.asarray(load_rgb(tmp_path / "p.png")).tolist() == [[[255, 255, 255], [50, 60, 70]]]
    la = Image.fromarray(np.array([[[40, 255], [40, 0]]], np.uint8), "LA")
    (tmp_path / "la.png").write_bytes(encode(la, "PNG"))
    assert np.asarray(load_rgb(tmp_path / "la.png")).tolist() == [[[40, 40, 40], [255, 255, 255]]]


def test_undecodable_files_raise_and_truncation_is_not_masked(tmp_path):
    planted = make_planted_folder(tmp_path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # importing the package set no global flag
    for rel in planted.bad:
        with pytest.raises(Exception):  # noqa: B017 - PIL raises OSError, SyntaxError, ... by format
            load_rgb(tmp_path / rel)


# ----------------------------------------------------------------------------- crops and normalisation


def test_crop_area_and_aspect_within_bounds():
    rng = random.Random(0)
    W, H = 400, 300
    boxes = [crop_box(W, H, (0.3, 1.0), (3 / 4, 4 / 3), rng) for _ in range(3000)]
    fracs = np.array([w * h / (W * H) for _, _, w, h in boxes])
    aspects = np.array([w / h for _, _, w, h in boxes])
    assert all(min(x, y) >= 0 and x + w <= W and y + h <= H for x, y, w, h in boxes)
    assert fracs.min() >= 0.3 * (1 - 0.01) and fracs.max() <= 1.0
    assert fracs.min() < 0.33 and fracs.max() > 0.95  # both ends of the range are reached
    assert aspects.min() >= 3 / 4 * 0.99 and aspects.max() <= 4 / 3 * 1.01
    # on a square image the rejections are symmetric in the aspect, so the log-aspect centres on 0
    square = [crop_box(300, 300, (0.3, 1.0), (3 / 4, 4 / 3), rng) for _ in range(3000)]
    assert abs(np.median([math.log(w / h) for _, _, w, h in square])) < 0.03


@settings(max_examples=300, deadline=None)
@given(
    W=st.integers(1, 3000),
    H=st.integers(1, 3000),
    lo=st.floats(0.01, 1.0),
    span=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32),
)
def test_crop_box_always_fits_the_image(W, H, lo, span, seed):
    x, y, w, h = crop_box(W, H, (lo, min(1.0, lo + span)), (3 / 4, 4 / 3), random.Random(seed))
    assert 0 <= x and 0 <= y and 1 <= w and 1 <= h and x + w <= W and y + h <= H  # noqa: SIM300


def test_crop_fallback_is_the_largest_centred_crop_in_ratio():
    rng = random.Random(0)
    # 1000 x 10: no attempt fits, so the fallback: height 10, width 10 * 4/3 -> 13, centred
    assert crop_box(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), rng) == ((1000 - 13) // 2, 0, 13, 10)
    assert crop_box(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (0, (1000 - 13) // 2, 10, 13)


def test_crop_rng_is_explicit_and_keyed():
    random.seed(123)
    state = random.getstate()
    a = [crop_rng(7, 2, 5).random() for _ in range(2)]
    assert a[0] == a[1] and random.getstate() == state  # global RNG neither read nor moved
    assert crop_rng(7, 2, 5).random() != crop_rng(7, 3, 5).random() != crop_rng(7, 2, 6).random()


def test_normalisation_of_a_constant_image():
    colour = (255, 128, 0)
    x = to_normalized_tensor(Image.new("RGB", (5, 4), colour))
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)])
    assert x.shape == (3, 4, 5) and x.dtype == torch.float32 and x.is_contiguous()
    torch.testing.assert_close(x.mean((1, 2)), expected)
    assert float(x.std((1, 2)).max()) == 0.0
    batch = normalize(torch.stack([pil_to_uint8(Image.new("RGB", (5, 4), colour))] * 2))
    assert batch.shape == (2, 3, 4, 5) and torch.equal(batch[1], x)


def test_grey_crop_equals_the_crop_of_its_rgb_conversion():
    gray = Image.fromarray(synthetic_photo(40, 30)[..., 1])
    a = random_resized_crop(gray, 16, (0.3, 1.0), crop_rng(0, 0, 1))
    b = random_resized_crop(gray.convert("RGB"), 16, (0.3, 1.0), crop_rng(0, 0, 1))
    assert a.shape == (3, 16, 16) and torch.equal(a, b)


def test_centre_crop_eval_geometry():
    assert center_box(400, 300, 224) == (50 + 300 * 0.125 / 2, 300 * 0.125 / 2, 262.5, 262.5)
    img = np.zeros((30, 40, 3), np.uint8)
    img[:, 5:35] = 255  # the centre 30 x 30 square is white, the side bands black
    out = center_crop_eval(Image.fromarray(img), 30, crop_fraction=1.0)
    assert out.shape == (3, 30, 30) and torch.equal(out, to_normalized_tensor(Image.new("RGB", (30, 30), "white")))
    # the default 0.875 takes the centre 26.25 px of the 30-px side: still inside the white square
    out = center_crop_eval(Image.fromarray(img), 24)
    assert out.shape == (3, 24, 24) and torch.equal(out, to_normalized_tensor(Image.new("RGB", (24, 24), "white")))


# ----------------------------------------------------------------------------- the loader


@pytest.mark.parametrize("workers", [0, 2])
def test_planted_bad_files_are_skipped_and_counted(tmp_path, workers, caplog):
    planted = make_planted_folder(tmp_path / "data")
    cfg = folder_cfg(tmp_path / "data", batch_size=planted.n_files, num_workers=workers)
    with caplog.at_level(logging.WARNING), build_pretrain_loader(cfg, grid=4, mask_kwargs=MASKS, seed=0) as loader:
        assert loader.steps_per_epoch == 1
        first, second = take(loader, 2)  # two epochs
    for batch in (first, second):
        assert batch.images.shape == (planted.n_files, 3, 32, 32) and batch.images.dtype == torch.float32
        assert torch.isfinite(batch.images).all() and batch.labels.dtype == torch.int64
        assert set(batch.labels.tolist()) <= {0, 1}
        assert batch.skipped == planted.n_bad == 3  # per sample whose own file is bad, even when two are neighbours
        check_masks(batch.masks, 4)
    assert loader.skipped == 2 * planted.n_bad
    named = {p.split(" (")[0] for p in loader.skipped_paths}
    assert named == {str(tmp_path / "data" / rel) for rel in planted.bad}
    assert sum("skipped an undecodable image" in r.message for r in caplog.records) == planted.n_bad  # once each
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_loader_is_deterministic_and_seeded(tmp_path):
    random_idx_pair(tmp_path, 40)
    cfg = idx_cfg(tmp_path)
    a = take(build_pretrain_loader(cfg, grid=7, mask_kwargs=MASKS, seed=3), 3)
    b = take(build_pretrain_loader(cfg, grid=7, mask_kwargs=MASKS, seed=3), 3)
    c = take(build_pretrain_loader(cfg, grid=7, mask_kwargs=MASKS, seed=4), 1)
    for x, y in zip(a, b):
        assert_same_batches(x, y)
    assert not torch.equal(a[0].images, c[0].images) and not torch.equal(a[0].masks.context, c[0].masks.context)
    assert a[0].images.shape == (8, 3, 28, 28)
    check_masks(a[0].masks, 7)  # 28 px, patch 4: the demo's small grid


def test_loader_leaves_global_rngs_alone(tmp_path):
    random_idx_pair(tmp_path, 16)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    take(build_pretrain_loader(idx_cfg(tmp_path, num_workers=0), grid=7, mask_kwargs=MASKS, seed=0), 3)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_batches_bitwise(tmp_path, workers):
    random_idx_pair(tmp_path, 40)  # 5 steps per epoch at batch 8: the resumed stretch crosses an epoch
    cfg = idx_cfg(tmp_path, num_workers=workers)
    full = take(build_pretrain_loader(cfg, grid=7, mask_kwargs=MASKS, seed=3), 9)
    with build_pretrain_loader(cfg, grid=7, mask_kwargs=MASKS, seed=3, start_step=3) as resumed:
        tail = take(resumed, 6)
    for a, b in zip(full[3:], tail):
        assert_same_batches(a, b)
    assert [b.step for b in tail] == list(range(3, 9)) and [b.epoch for b in tail] == [0, 0, 1, 1, 1, 1]
    # the worker count changes nothing either
    other = take(
        build_pretrain_loader(idx_cfg(tmp_path, num_workers=2 - workers), grid=7, mask_kwargs=MASKS, seed=3), 2
    )
    assert_same_batches(full[1], other[1])


def test_resume_on_a_folder_with_bad_files(tmp_path):
    planted = make_planted_folder(tmp_path)
    cfg = folder_cfg(tmp_path, batch_size=4, crop_size=16)
    loader = build_pretrain_loader(cfg, grid=4, mask_kwargs=MASKS, seed=1)
    full = take(loader, 6)
    tail = take(build_pretrain_loader(cfg, grid=4, mask_kwargs=MASKS, seed=1, start_step=2), 4)
    for a, b in zip(full[2:], tail):
        assert_same_batches(a, b)
    # an epoch is 4 steps of 4 = 16 of the 18 files (drop-last): it counts exactly the bad ones it uses
    used = {loader.dataset.source.describe(i) for i in loader.batch_sampler.epoch_indices(0).tolist()}
    assert loader.steps_per_epoch == 4 and full[4].epoch == 1
    assert sum(b.skipped for b in full[:4]) == len(used & {str(tmp_path / rel) for rel in planted.bad})


def test_samplers_of_two_ranks_cover_every_index_once_per_epoch():
    for n, batch in ((48, 6), (50, 6)):  # 50: 2 images dropped per epoch, the same number of steps per rank
        samplers = [StepBatchSampler(n, batch, seed=1, rank=r, world_size=2) for r in (0, 1)]
        assert samplers[0].steps_per_epoch == samplers[1].steps_per_epoch == 4
        its = [iter(s) for s in samplers]
        for epoch in range(3):
            seen = []
            for _ in range(4):
                for it in its:
                    keys = next(it)
                    assert len(keys) == batch and {e for _, _, e in keys} == {epoch}
                    seen += [i for i, _, _ in keys]
            assert len(seen) == len(set(seen)) == 48
            if n == 48:
                assert sorted(seen) == list(range(48))


def test_the_same_global_batch_over_other_ranks_and_accumulation_takes_the_same_samples_each_step():
    """45 images, global batch 6: 2 ranks x 3 x 1 micro-batch, or 1 rank x 3 x 2 micro-batches. Every
    optimizer step takes the same 6 samples, over three epochs (7 steps each, 3 images dropped), also
    when the single rank resumes mid-run; both count the same optimizer steps per epoch."""
    n, batch, steps = 45, 3, 21
    two = [iter(StepBatchSampler(n, batch, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    one = StepBatchSampler(n, batch, seed=1, world_size=1, accum=2)
    assert one.steps_per_epoch // 2 == StepBatchSampler(n, batch, seed=1, rank=0, world_size=2).steps_per_epoch == 7
    ones, resumed = iter(one), iter(StepBatchSampler(n, batch, seed=1, world_size=1, start_step=2 * 10, accum=2))

    def indices(*micro_batches) -> list[int]:
        return sorted(i for keys in micro_batches for i, _, _ in keys)

    for step in range(steps):
        want = indices(next(two[0]), next(two[1]))
        got = indices(next(ones), next(ones))
        assert got == want, step
        if step >= 10:
            assert indices(next(resumed), next(resumed)) == want, step


def test_two_rank_loaders_see_disjoint_halves(tmp_path):
    n = 32
    images = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None] * 7, 28 * 28).reshape(n, 28, 28)
    write_idx_pair(tmp_path, images, np.arange(n) % 10)
    seen = []
    for rank in (0, 1):
        loader = build_pretrain_loader(
            idx_cfg(tmp_path, batch_size=4), grid=7, mask_kwargs=MASKS, seed=5, rank=rank, world_size=2
        )
        assert loader.steps_per_epoch == 4
        for batch in take(loader, 4):  # one epoch
            # constant images stay constant under crops: the value names the sample
            pixel = batch.images[:, 0, 0, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
            seen += torch.round(pixel * 255 / 7).long().tolist()
    assert sorted(seen) == list(range(n))


def test_start_step_skips_without_decoding(tmp_path, monkeypatch):
    random_idx_pair(tmp_path, 40)
    calls = []
    original = IdxDataset.__getitem__
    monkeypatch.setattr(IdxDataset, "__getitem__", lambda self, i: calls.append(i) or original(self, i))
    batch = take(build_pretrain_loader(idx_cfg(tmp_path), grid=7, mask_kwargs=MASKS, seed=0, start_step=1000), 1)[0]
    assert batch.step == 1000 and batch.epoch == 200 and len(calls) == 8


def test_limit_takes_the_first_images(tmp_path):
    random_idx_pair(tmp_path, 40)
    loader = build_pretrain_loader(idx_cfg(tmp_path, limit=16), grid=7, mask_kwargs=MASKS, seed=0)
    assert loader.steps_per_epoch == 2 and len(loader.dataset) == 16
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_pretrain_loader(idx_cfg(tmp_path, limit=7), grid=7, mask_kwargs=MASKS, seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_batches_come_pinned(tmp_path):
    random_idx_pair(tmp_path, 16)
    batch = take(build_pretrain_loader(idx_cfg(tmp_path, pin_memory=True), grid=7, mask_kwargs=MASKS, seed=0), 1)[0]
    assert batch.images.is_pinned() and batch.masks.context.is_pinned() and batch.masks.targets.is_pinned()


# ----------------------------------------------------------------------------- errors before any model


def test_missing_or_empty_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root is empty"):
        check_data_source(DataConfig(dataset="folder", root=""))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist"):
        check_data_source(DataConfig(dataset="folder", root=str(tmp_path / "nope")))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'} holds no images"):
        check_data_source(DataConfig(dataset="folder", root=str(tmp_path / "empty"), split=""))
    with pytest.raises(FileNotFoundError, match="holds no images"):
        build_pretrain_loader(folder_cfg(tmp_path / "empty"), grid=4, mask_kwargs=MASKS, seed=0)
    with pytest.raises(FileNotFoundError, match=f"no IDX file train-images-idx3-ubyte.*{tmp_path / 'empty'}"):
        check_data_source(DataConfig(dataset="idx", root=str(tmp_path / "empty")))
    (tmp_path / "tars").mkdir()
    (tmp_path / "tars" / "shard-000.tar").write_bytes(b"")
    for loader in ("dali", "pytorch"):  # both read webdataset shards: a damaged one is named when opened
        cfg = DataConfig(dataset="folder", root=str(tmp_path / "tars"), split="", loader=loader)
        check_data_source(cfg)
    with pytest.raises(DataSourceError, match=f"webdataset shard {tmp_path / 'tars' / 'shard-000.tar'} is truncated"):
        build_pretrain_loader(folder_cfg(tmp_path / "tars"), grid=4, mask_kwargs=MASKS, seed=0)


def test_bad_idx_header_fails_the_source_check(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"GIF89a not idx"))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3, np.uint8))))
    with pytest.raises(IdxFormatError, match="bad magic number"):
        check_data_source(DataConfig(dataset="idx", root=str(tmp_path)))


def test_split_subfolder_is_used_when_present(tmp_path):
    make_planted_folder(tmp_path / "train")
    (tmp_path / "val" / "x").mkdir(parents=True)
    (tmp_path / "val" / "x" / "a.jpg").write_bytes(encode(synthetic_photo()))
    check_data_source(DataConfig(dataset="folder", root=str(tmp_path), split="train"))
    ds = build_eval_dataset(folder_cfg(tmp_path, crop_size=16), split="val")
    assert len(ds) == 1 and ds[0][0].shape == (3, 16, 16)


# ----------------------------------------------------------------------------- evaluation


def test_eval_dataset_idx_is_the_whole_image(tmp_path):
    images, labels = random_idx_pair(tmp_path, 6, split="test")
    ds = build_eval_dataset(idx_cfg(tmp_path), split="test")
    x, y = ds[2]
    assert len(ds) == 6 and x.shape == (3, 28, 28) and y == labels[2]
    gray = (torch.from_numpy(images[2]).float() / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    torch.testing.assert_close(x[0], gray)
    xs, ys = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert xs.shape == (4, 3, 28, 28) and ys.tolist() == labels[:4].tolist()


def test_eval_dataset_on_a_folder_with_bad_files(tmp_path, caplog):
    planted = make_planted_folder(tmp_path)
    ds = build_eval_dataset(folder_cfg(tmp_path, crop_size=24), split="")
    with caplog.at_level(logging.WARNING):
        out = [ds[i] for i in range(len(ds))]
    assert len(out) == planted.n_files and all(x.shape == (3, 24, 24) for x, _ in out)
    assert len(ds.bad) == planted.n_bad


# ----------------------------------------------------------------------------- the benchmark


def test_benchmark_runs_quick(tmp_path, capsys):
    from profiling.bench_data import main

    rows = main(["--quick", "--workers", "0", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| loader | workers |" in out and rows and rows[0]["images_per_s"] > 0


@pytest.mark.parametrize("workers", [0, 2])
def test_pretraining_on_a_folder_of_undecodable_images_is_one_line_naming_it(tmp_path, capsys, workers):
    from ijepa_fast.cli import pretrain
    from tests.test_trainer import tiny_overrides

    for i in range(6):
        (tmp_path / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / f"c{i % 2}" / f"{i}.jpg").write_text("not an image")
    extra = {"data.dataset": "folder", "data.split": "", "data.batch_size": 2, "data.num_workers": workers}
    assert pretrain.main(tiny_overrides(tmp_path / "data", tmp_path / "runs", "bad", **extra)) == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if " ERROR " in line]
    assert f"{tmp_path / 'data'}: none of its 6 images can be decoded (first: " in line
    assert "Traceback" not in err and not list((tmp_path / "runs" / "bad").glob("checkpoints/*"))


def _split_tree(root, splits: dict[str, list[str]]) -> None:
    """root/<split>/<class>/img*.jpg, two small images per class."""
    for split, classes in splits.items():
        for c in classes:
            for i in range(2):
                (root / split / c).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / split / c / f"img{i}.jpg")


@pytest.mark.parametrize("split", ["trian", "val"])
def test_a_split_missing_from_a_split_root_is_named_not_read_as_the_whole_root(tmp_path, split):
    """A misspelt split, or a test split of another name, would have read every split at once,
    labelled by split name (and the test set holding the training images)."""
    _split_tree(tmp_path, {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    for check in (
        lambda: check_data_source(DataConfig(dataset="folder", root=str(tmp_path), split=split)),
        lambda: build_eval_dataset(DataConfig(dataset="folder", root=str(tmp_path)), split=split),
    ):
        with pytest.raises(FileNotFoundError, match=rf"{split} does not exist; .* is split into train, test"):
            check()


def test_a_root_of_class_folders_is_read_whole_under_the_default_split(tmp_path):
    """No split folders at all: data.split=train (the default) reads the root's class folders."""
    _split_tree(tmp_path, {"classes": ["cat", "dog"]})
    ds = build_eval_dataset(DataConfig(dataset="folder", root=str(tmp_path / "classes")), split="train")
    assert len(ds) == 4 and ds.source.classes == ["cat", "dog"] and ds.source.labels.tolist() == [0, 0, 1, 1]


def test_a_class_has_one_label_in_every_split_when_a_split_lacks_some(tmp_path):
    _split_tree(tmp_path, {"train": ["cat", "dog"], "val": ["dog"]})
    cfg = DataConfig(dataset="folder", root=str(tmp_path))
    train, val = (build_eval_dataset(cfg, split=s).source for s in ("train", "val"))
    dog = train.classes.index("dog")
    assert dog == 1 and val.labels.tolist() == [dog, dog] and val.classes == train.classes == ["cat", "dog"]
