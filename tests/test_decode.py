"""The pretraining view from a file's bytes (``data.decode``): the authors' RandomResizedCrop
distribution kept (box statistics against a re-statement of torchvision's sampler), the DCT scale
that covers the crop, pixels against the full decode, every decoder and fallback, damaged files,
flips, and the loader's uint8 batches; plus the loader benchmark at a tiny size."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ijepa_fast.data.decode import (
    REDUCTIONS,
    _resample_rgbx,
    _rgb_over,
    fast_resample,
    random_resized_crop_bytes,
    reduction,
)
from ijepa_fast.data.folder import ImageFolderDataset, load_rgb
from ijepa_fast.data.loader import Collate, PretrainDataset
from ijepa_fast.data.synthetic import encode, synthetic_photo, write_jpeg_folder
from ijepa_fast.data.transforms import (
    CROP_RATIO,
    crop_box,
    crop_then_resize,
    normalize,
    pil_to_uint8,
    random_resized_crop_pil,
    resized_crop,
)
from ijepa_fast.masks.sampler import MultiBlockMaskSampler
from ijepa_fast.runtime.optional import available
from ijepa_fast.runtime.rng import crop_rng
from profiling.authors_pipeline import get_params

SCALE = (0.3, 1.0)
DECODERS = [
    "pillow",
    pytest.param("simplejpeg", marks=pytest.mark.skipif(not available("simplejpeg"), reason="no simplejpeg")),
]


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


def _stats(boxes: list[tuple[int, int, int, int]], W: int, H: int) -> dict[str, np.ndarray]:
    b = np.array(boxes, dtype=np.float64)  # (left, top, w, h)
    free_x, free_y = np.maximum(W - b[:, 2], 1), np.maximum(H - b[:, 3], 1)
    return {
        "scale": b[:, 2] * b[:, 3] / (W * H),
        "log_ratio": np.log(b[:, 2] / b[:, 3]),
        "x": np.where(b[:, 2] < W, b[:, 0] / free_x, 0.5),  # where the free room is split, 0..1
        "y": np.where(b[:, 3] < H, b[:, 1] / free_y, 0.5),
    }


@pytest.mark.parametrize("W,H", [(500, 375), (333, 500), (1000, 200)])
def test_crop_boxes_follow_the_authors_random_resized_crop(W, H):
    """Scale, log-aspect and position of our boxes against torchvision's sampler (re-stated in
    profiling/authors_pipeline.py): KS distance below 0.04 over 6,000 draws each. Two samples of
    one distribution stay below 1.95 sqrt(2 / n) = 0.036 with probability 0.999; a biased sampler
    (a 0.08 lower scale bound, a flat aspect instead of log-flat, corners from [0, W - w)) fails."""
    n = 6_000
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    ours = _stats([crop_box(W, H, SCALE, CROP_RATIO, rng) for _ in range(n)], W, H)
    theirs = _stats([(j, i, w, h) for i, j, h, w in (get_params(W, H, SCALE, g=g) for _ in range(n))], W, H)
    for key in ours:
        assert _ks(ours[key], theirs[key]) < 0.04, key
    # the test can fail: a crop sampler with torchvision's default scale is far from theirs
    wrong = _stats([crop_box(W, H, (0.08, 1.0), CROP_RATIO, rng) for _ in range(n)], W, H)
    assert _ks(wrong["scale"], theirs["scale"]) > 0.1


def test_reduction_is_the_largest_dct_scale_that_covers_the_output():
    rng = random.Random(1)
    for _ in range(2000):
        W, H = rng.randint(50, 4000), rng.randint(50, 4000)
        box = crop_box(W, H, SCALE, CROP_RATIO, rng)
        k = reduction(box, 224)
        assert k in REDUCTIONS
        if k > 1:
            assert box[2] / k >= 224 and box[3] / k >= 224  # the decoded crop holds the output's pixels
        if k < 8:
            assert box[2] / (2 * k) < 224 or box[3] / (2 * k) < 224  # one step smaller would not
    assert reduction((0, 0, 1800, 1800), 224) == 8 and reduction((0, 0, 447, 900), 224) == 1


def _full_decode_view(data: bytes, seed: int, size: int = 224) -> torch.Tensor:
    """The reference: the whole image decoded, the box drawn on it, cut and resized."""
    return pil_to_uint8(random_resized_crop_pil(load_rgb(io.BytesIO(data)), size, SCALE, random.Random(seed)))


@pytest.mark.parametrize("decoder", DECODERS)
def test_bytes_view_matches_the_full_decode(decoder):
    """At scale 1 the pixels are the full-decode path's, bit for bit with Pillow's resample (same
    libjpeg, same box, same resample) and within 1 with torch's; at a reduced scale they differ only
    by the DCT's low-pass: mean error below 1.5 of 255 (a box drawn differently gives tens)."""
    small = encode(synthetic_photo(300, 200, seed=1), quality=90)
    large = encode(synthetic_photo(1200, 900, seed=2), quality=90)
    for seed in range(3):  # 200 px high: no crop reaches 2 x 120
        ref = _full_decode_view(small, seed, 120)
        out = random_resized_crop_bytes(small, 120, SCALE, random.Random(seed), decoder=decoder, resample="pillow")
        assert torch.equal(out, ref)
        out = random_resized_crop_bytes(small, 120, SCALE, random.Random(seed), decoder=decoder, resample="torch")
        assert (out.int() - ref.int()).abs().max() <= (0 if decoder == "pillow" else 1)
    reduced = 0
    for seed in range(4):
        out = random_resized_crop_bytes(large, 224, SCALE, random.Random(seed), decoder=decoder)
        ref = _full_decode_view(large, seed)
        reduced += reduction(crop_box(1200, 900, SCALE, CROP_RATIO, random.Random(seed)), 224) > 1
        assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
        assert (out.float() - ref.float()).abs().mean() < 1.5
    assert reduced >= 2  # the large image did go through the reduced decode
    other_box = _full_decode_view(large, 99)
    out = random_resized_crop_bytes(large, 224, SCALE, random.Random(0), decoder=decoder)
    assert (out.float() - other_box.float()).abs().mean() > 5


@pytest.mark.parametrize("decoder", DECODERS)
def test_exact_pixels_are_the_full_decode_views_bit_for_bit_where_a_reduced_decode_would_differ(decoder, tmp_path):
    """reduce=False with Pillow's resample (data.exact_pixels) gives the authors' pixels on crops the
    fast path decodes at a reduced scale, through the function and through the dataset."""
    large = encode(synthetic_photo(1200, 900, seed=2), quality=90)
    differed = 0
    for seed in range(4):
        ref = _full_decode_view(large, seed)
        exact = random_resized_crop_bytes(
            large, 224, SCALE, random.Random(seed), decoder=decoder, resample="pillow", reduce=False
        )
        assert torch.equal(exact, ref)
        fast = random_resized_crop_bytes(large, 224, SCALE, random.Random(seed), decoder=decoder, resample="pillow")
        differed += not torch.equal(fast, ref)
    assert differed >= 2  # the reduced decode did change those views
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jpg").write_bytes(large)
    folder = ImageFolderDataset(tmp_path)
    ds = PretrainDataset(folder, 224, SCALE, seed=3, decoder=decoder, exact_pixels=True)
    for epoch in range(4):
        ref = pil_to_uint8(random_resized_crop_pil(load_rgb(folder.paths[0]), 224, SCALE, crop_rng(3, epoch, 0)))
        assert torch.equal(ds[(0, 0, epoch)][0], ref)


def test_exact_pixels_take_the_pytorch_loader_and_refuse_dali():
    from ijepa_fast import config as config_mod
    from ijepa_fast.config import ConfigError
    from ijepa_fast.data.build import resolve_loader_kind

    cfg = config_mod.load(None, ["data.exact_pixels=true", "data.dataset=folder"]).data
    assert resolve_loader_kind(cfg, "cuda") == "pytorch"  # auto: DALI would be taken on a GPU
    cfg.loader = "dali"
    with pytest.raises(ConfigError, match="data.exact_pixels=true .* data.loader=pytorch"):
        resolve_loader_kind(cfg, "cuda")


def _authors_resized_crop(img: Image.Image, box, size: int) -> Image.Image:
    """torchvision's ``F.resized_crop`` on a PIL image, as the authors' RandomResizedCrop runs it."""
    left, top, w, h = box
    return img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_crop_then_resize_is_the_authors_resized_crop_pixel_for_pixel(mode):
    """Shrinking and enlarging crops of an odd-sized image equal the authors' crop-then-resize bit
    for bit; the one-call resample of the region (``resized_crop``, which the evaluation view uses)
    reads pixels outside the box and differs for most of them."""
    rng = random.Random(0)
    img = Image.fromarray(synthetic_photo(157, 113, seed=3)).convert(mode)
    differs = 0
    for _ in range(60):
        box = crop_box(157, 113, (0.02, 1.0), CROP_RATIO, rng)
        size = rng.choice([7, 32, 64, 224])
        ours = np.asarray(crop_then_resize(img, box, size))
        assert np.array_equal(ours, np.asarray(_authors_resized_crop(img, box, size))), (box, size)
        differs += not np.array_equal(np.asarray(resized_crop(img, box, size)), ours)
    assert differs > 30


def test_crop_then_resize_reads_nothing_outside_the_pixels_that_enclose_the_box():
    arr = synthetic_photo(90, 70, seed=5)
    boxes = [(10, 5, 40, 30), (10.25, 5.5, 40.5, 30.25), (0, 0, 90, 70), (3.5, 0.0, 86.5, 70.0)]
    for box in boxes:
        left, top, w, h = box
        x0, y0, x1, y1 = math.floor(left), math.floor(top), math.ceil(left + w), math.ceil(top + h)
        other = 255 - arr  # every pixel changed...
        other[y0:y1, x0:x1] = arr[y0:y1, x0:x1]  # ...but those enclosing the box
        out = np.asarray(crop_then_resize(Image.fromarray(arr), box, 24))
        assert np.array_equal(out, np.asarray(crop_then_resize(Image.fromarray(other), box, 24))), box
    whole = crop_then_resize(Image.fromarray(arr), (10, 5, 40, 30), 24)
    assert np.array_equal(
        np.asarray(whole), np.asarray(crop_then_resize(Image.fromarray(arr), (10.0, 5.0, 40.0, 30.0), 24))
    )


@pytest.mark.skipif(fast_resample() != "torch", reason="torch's resample is used only on x86 with AVX2 or AVX-512")
def test_torch_resample_is_within_one_of_pillows_crop_then_resize():
    """Over odd image, crop and output sizes, shrinking and enlarging: no value more than 1 from
    Pillow's (out of 255), and few of them 1 away."""
    rng = random.Random(0)
    worst, changed, total = 0, 0, 0
    for i in range(40):
        W, H = rng.randint(20, 400), rng.randint(20, 400)
        rgb = synthetic_photo(W, H, seed=i)
        rgbx = np.concatenate([rgb, np.full((H, W, 1), 255, np.uint8)], axis=2)
        box = crop_box(W, H, (0.02, 1.0), CROP_RATIO, rng)
        size = rng.choice([16, 57, 224])
        ours = _resample_rgbx(rgbx, box, size)
        ref = pil_to_uint8(crop_then_resize(Image.fromarray(rgb), box, size))
        diff = (ours.int() - ref.int()).abs()
        worst, changed, total = max(worst, int(diff.max())), changed + int((diff > 0).sum()), total + diff.numel()
    assert worst <= 1 and changed / total < 0.1, (worst, changed / total)


def test_rgbx_bytes_resample_as_rgb_without_a_copy():
    """The decoded RGBX array is mapped as an RGB image (its memory, not a copy), and its resample
    over odd boxes equals the first three channels of the RGBX image's resample (Pillow's public
    map), and the same box cut from a plain RGB copy."""
    arr = np.random.default_rng(0).integers(0, 256, size=(131, 97, 4), dtype=np.uint8)
    img = _rgb_over(arr)
    assert img.mode == "RGB" and img.size == (97, 131)
    assert np.array_equal(np.asarray(img), arr[..., :3])
    arr[3, 5, :3] = (1, 2, 3)  # the image reads the array's memory
    assert img.getpixel((5, 3)) == (1, 2, 3)
    rgbx = Image.frombuffer("RGBX", (97, 131), arr, "raw", "RGBX", 0, 1)
    plain = Image.fromarray(np.ascontiguousarray(arr[..., :3]))
    for box in ((0.0, 0.0, 97.0, 131.0), (3.5, 7.25, 80.0, 101.75), (11.0, 2.0, 60.0, 45.0)):
        for size in (17, 40):
            out = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR, box=box))
            assert np.array_equal(
                out, np.asarray(rgbx.resize((size, size), Image.Resampling.BILINEAR, box=box))[..., :3]
            )
            assert np.array_equal(out, np.asarray(plain.resize((size, size), Image.Resampling.BILINEAR, box=box)))


@pytest.mark.skipif(not available("simplejpeg"), reason="no simplejpeg")
def test_without_pillows_rgb_map_the_rgbx_image_gives_the_same_views(monkeypatch):
    data = encode(synthetic_photo(640, 480, seed=8), quality=90)
    before = [
        random_resized_crop_bytes(data, 64, SCALE, random.Random(s), flip=True, resample="pillow") for s in range(4)
    ]
    real = Image.core.map_buffer

    def no_rgb(buf, size, decoder, offset, args):  # a Pillow whose map takes only its public modes
        if args[0] == "RGB":
            raise ValueError("unsupported mode")
        return real(buf, size, decoder, offset, args)

    monkeypatch.setattr(Image.core, "map_buffer", no_rgb)
    assert _rgb_over(np.zeros((2, 3, 4), np.uint8)).mode == "RGBX"
    after = [
        random_resized_crop_bytes(data, 64, SCALE, random.Random(s), flip=True, resample="pillow") for s in range(4)
    ]
    assert all(torch.equal(a, b) and b.is_contiguous() for a, b in zip(before, after))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_pil_to_uint8_is_a_contiguous_copy_in_channel_first_order(mode):
    pixels = np.random.default_rng(1).integers(0, 256, size=(3, 5, 3), dtype=np.uint8)
    img = Image.fromarray(pixels[..., 0] if mode == "L" else pixels)
    out = pil_to_uint8(img)
    ref = np.array(img).reshape(3, 5, -1).transpose(2, 0, 1)
    assert out.is_contiguous() and out.shape == ref.shape and np.array_equal(out.numpy(), ref)
    out.add_(1)  # the tensor owns its memory: the image and the next conversion are unchanged
    assert np.array_equal(np.array(img).reshape(3, 5, -1).transpose(2, 0, 1), ref)
    assert np.array_equal(pil_to_uint8(img).numpy(), ref)


@pytest.mark.parametrize("decoder", DECODERS)
def test_other_files_take_the_full_decode_with_the_same_box(decoder):
    rgb = synthetic_photo(900, 700, seed=4)
    files = {
        "png": encode(rgb, "PNG"),
        "cmyk": encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=90),
        "grey": encode(Image.fromarray(rgb[..., 0]), "JPEG", quality=90),
    }
    for name, data in files.items():
        out = random_resized_crop_bytes(data, 100, SCALE, random.Random(5), decoder=decoder)
        ref = _full_decode_view(data, 5, 100)
        assert out.shape == (3, 100, 100), name
        assert (out.float() - ref.float()).abs().mean() < 1.5, name  # grey JPEGs may take the reduced decode


@pytest.mark.parametrize("decoder", DECODERS)
def test_damaged_files_raise(decoder):
    data = encode(synthetic_photo(400, 300, seed=6), quality=90)
    for bad in (data[: len(data) // 2], b"", b"\xff\xd8not a jpeg", b"plain text"):
        with pytest.raises(Exception):  # noqa: B017 (whatever Pillow raises for it, as load_rgb)
            random_resized_crop_bytes(bad, 64, SCALE, random.Random(0), decoder=decoder)


def test_flip_mirrors_half_of_the_views():
    data = encode(synthetic_photo(200, 150, seed=7), quality=90)
    flipped = 0
    for seed in range(40):
        plain = random_resized_crop_bytes(data, 32, SCALE, random.Random(seed))
        out = random_resized_crop_bytes(data, 32, SCALE, random.Random(seed), flip=True)
        if not torch.equal(out, plain):
            assert torch.equal(out, plain.flip(-1))
            flipped += 1
    assert 10 <= flipped <= 30  # Binomial(40, 1/2): outside this with probability < 0.002


def test_loader_items_and_uint8_batches(tmp_path):
    """The dataset's views are the full-decode path's with the crop generator of (seed, epoch,
    index) (no reduced scale at this size; within 1 with the default resample, exactly with
    Pillow's); a uint8 batch normalises to the float batch."""
    write_jpeg_folder(tmp_path, 6, size=(96, 72))
    folder = ImageFolderDataset(tmp_path)
    ds = PretrainDataset(folder, 48, SCALE, seed=3, resample="pillow")
    items = [ds[(i, 0, 2)] for i in range(6)]
    default = PretrainDataset(folder, 48, SCALE, seed=3)
    for i, (img, label, step, epoch, bad) in enumerate(items):
        ref = pil_to_uint8(random_resized_crop_pil(load_rgb(folder.paths[i]), 48, SCALE, crop_rng(3, 2, i)))
        assert torch.equal(img, ref) and (label, step, epoch, bad) == (int(folder.labels[i]), 0, 2, "")
        assert img.is_contiguous()  # a batch stacks by plain copies
        fast = default[(i, 0, 2)][0]
        assert fast.is_contiguous() and (fast.int() - ref.int()).abs().max() <= 1
    masks = MultiBlockMaskSampler(4, num_pred_masks=2, min_keep=2)
    as_uint8, as_float = Collate(masks, uint8=True)(items), Collate(masks)(items)
    assert as_uint8.images.dtype == torch.uint8 and as_float.images.dtype == torch.float32
    assert torch.equal(normalize(as_uint8.images), as_float.images)
    assert torch.equal(as_uint8.masks.context, as_float.masks.context)


def test_loader_bench_runs_quickly(tmp_path, capsys):
    from profiling import bench_loader

    rows = bench_loader.main(["--quick", "--dir", str(tmp_path), "--num-images", "8", "--batch-size", "4"])
    assert set(rows) >= {"authors", "ours", "ours-uint8", "ours-uint8-pillow-resample"} and all(
        r["images_per_s"] > 0 for r in rows.values()
    )
    assert math.isclose(rows["authors"]["x_authors"], 1.0)
    assert "x authors" in capsys.readouterr().out
