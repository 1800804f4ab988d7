"""The pretraining view (RandomResizedCrop) and the evaluation view (centre crop), with PIL and torch
only (no torchvision), each randomness drawn from an explicit per-sample generator.

Pretraining (the paper): RandomResizedCrop with area scale (0.3, 1.0) and aspect ratio (3/4, 4/3),
resized to the crop size, normalised with the ImageNet mean and std; no colour jitter, no blur, and
no flips unless asked (``random_flip``: the authors' optional RandomHorizontalFlip, off in their
configs). ``crop_box`` keeps torchvision's semantics: ten attempts at (area ~ U(scale) x image area,
log-aspect ~ U(log ratio)), the first that fits is placed uniformly; else the largest centred crop
whose aspect ratio lies in the range. The crop is cut out, then resized (``crop_then_resize``:
torchvision's ``F.resized_crop`` on a PIL image, bilinear with a support widened by the downscale
factor, i.e. antialiased), so the filter reads no pixel outside the crop, as theirs. The evaluation
view resamples its centre region in one call instead (``resized_crop``), as resizing the whole image
first would.

``ijepa_fast.runtime.rng.crop_rng(seed, epoch, index)`` is the only source of a sample's crop randomness: a resumed run,
a run with more or fewer workers, and the DALI loader (which computes the same windows) all see
the same crop of the same image at the same step.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.3, 1.0)  # the paper's RandomResizedCrop area range (torchvision's default is 0.08)
CROP_RATIO = (3 / 4, 4 / 3)
EVAL_CROP_FRACTION = 0.875  # the centre crop is 87.5% of the shorter side (resize 256 -> crop 224)

Box = tuple[int, int, int, int]  # (left, top, width, height) in pixels of the source image


def crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> Box:
    """(left, top, w, h) of a RandomResizedCrop window of a ``width`` x ``height`` image.

    Area fraction ~ U(scale), log-aspect ~ U(log ratio); ten attempts, then the largest centre crop
    within the ratio range (torchvision's semantics; ``rng`` supplies every draw).
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resized_crop(img: Image.Image, box: tuple[float, float, float, float], size: int) -> Image.Image:
    """The region ``box`` = (left, top, w, h) of ``img`` resampled to ``size`` x ``size`` (bilinear,
    antialiased when shrinking); a no-op copy when the box is the whole image at that size."""
    left, top, w, h = box
    return img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))


def crop_then_resize(img: Image.Image, box: tuple[float, float, float, float], size: int) -> Image.Image:
    """The region ``box`` = (left, top, w, h) cut out of ``img``, then resampled to ``size`` x
    ``size`` (bilinear, antialiased when shrinking): the authors' RandomResizedCrop, pixel for pixel
    for a whole-pixel box. Unlike ``resized_crop``, the filter reads nothing outside the cut, so at
    the crop's edges it clamps, as theirs does. A fractional box (a reduced-scale decode's) is cut
    at the whole pixels that enclose it and resampled over its exact extent within them."""
    left, top, w, h = box
    x0, y0 = math.floor(left), math.floor(top)
    x1, y1 = min(math.ceil(left + w), img.width), min(math.ceil(top + h), img.height)
    region = img.crop((x0, y0, x1, y1))
    inner = (left - x0, top - y0, min(left + w - x0, x1 - x0), min(top + h - y0, y1 - y0))
    return region.resize((size, size), Image.Resampling.BILINEAR, box=inner)


def random_resized_crop_pil(
    img: Image.Image, size: int, scale: tuple[float, float], rng: random.Random, ratio: tuple[float, float] = CROP_RATIO
) -> Image.Image:
    """The pretraining view as a ``size`` x ``size`` PIL image of ``img``'s mode."""
    return crop_then_resize(img, crop_box(img.width, img.height, scale, ratio, rng), size)


def random_flip(img: Image.Image, rng: random.Random) -> Image.Image:
    """``img`` mirrored left-right with probability 1/2 (one draw from ``rng``)."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """An L or RGB PIL image -> [C, H, W] uint8 (C = 1 or 3), contiguous."""
    if img.mode not in ("L", "RGB"):
        raise ValueError(f"expected an L or RGB image, got mode {img.mode}")
    hwc = np.asarray(img).reshape(img.height, img.width, -1)  # Pillow's bytes, read-only
    # One copy into channel-first order, writable (torch refuses read-only buffers): a batch then
    # stacks with plain copies instead of gathering every third byte.
    return torch.from_numpy(hwc.transpose(2, 0, 1).copy())  # order C: contiguous, also for L


def normalization_stats(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet (mean, std) as float32 [3, 1, 1] on ``device``; made once per device by a caller
    that normalises every step (a host-to-device copy of a pageable tensor waits for the device)."""
    return (
        torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1).to(device),
        torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1).to(device),
    )


def normalize(images: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 [..., C, H, W] (C = 1 or 3; one channel is repeated) -> float32 [..., 3, H, W],
    (x / 255 - mean) / std with the ImageNet statistics, contiguous, on the images' device.

    The same three IEEE-rounded ops on any device, so the CPU loader's floats and a GPU's are equal
    bit for bit. ``stats``: ``normalization_stats(images.device)``, made once (None: made here)."""
    if images.shape[-3] == 1:
        images = images.expand(*images.shape[:-3], 3, *images.shape[-2:])
    mean, std = stats if stats is not None else normalization_stats(images.device)
    out = images.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
    return out.sub_(mean).div_(std)


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """An L or RGB PIL image -> [3, H, W] float32 normalised with the ImageNet mean and std."""
    return normalize(pil_to_uint8(img))


def random_resized_crop(
    img: Image.Image, size: int, scale: tuple[float, float], rng: random.Random, ratio: tuple[float, float] = CROP_RATIO
) -> torch.Tensor:
    """The pretraining view of an L or RGB image: [3, size, size] float32, normalised."""
    return to_normalized_tensor(random_resized_crop_pil(img, size, scale, rng, ratio))


def center_box(
    width: int, height: int, size: int, crop_fraction: float = EVAL_CROP_FRACTION
) -> tuple[float, float, float, float]:
    """(left, top, w, h), possibly fractional, of the centre crop that "resize the shorter side to
    size / crop_fraction, then cut size x size from the centre" takes from the source image."""
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction={crop_fraction} must lie in (0, 1]")
    side = min(width, height) * crop_fraction  # size / (shorter-side scale factor)
    return (width - side) / 2, (height - side) / 2, side, side


def center_crop_eval(img: Image.Image, size: int, crop_fraction: float = EVAL_CROP_FRACTION) -> torch.Tensor:
    """The evaluation view: [3, size, size] float32, normalised.

    Resize the shorter side to ``size / crop_fraction`` and cut the centre ``size`` x ``size``,
    done as one resample of the centre region (no double rounding). ``crop_fraction=1`` keeps the
    whole shorter side (a square image at ``size`` comes back unchanged).
    """
    return to_normalized_tensor(resized_crop(img, center_box(img.width, img.height, size, crop_fraction), size))
