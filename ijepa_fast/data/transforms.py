"""RandomResizedCrop and normalisation with PIL and torch (no torchvision), seeded per sample."""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
             rng: random.Random) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop: area fraction ~ U(scale), log-aspect ~ U(log ratio); ten
    attempts, then the largest centre crop within the ratio range (torchvision's semantics)."""
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


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float32 normalised with the ImageNet mean and std."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return arr.sub_(mean).div_(std)


def random_resized_crop(img: Image.Image, size: int, scale: tuple[float, float], rng: random.Random,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """The pretraining view: random crop, bilinear resize to size x size, normalise. No flips or jitter."""
    left, top, w, h = crop_box(img.width, img.height, scale, ratio, rng)
    return to_normalized_tensor(img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h)))


def center_crop_eval(img: Image.Image, size: int) -> torch.Tensor:
    """Evaluation view: resize the shorter side to size / 0.875, centre crop size x size, normalise."""
    short = round(size / 0.875) if min(img.size) != size else size
    scale = short / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BILINEAR)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return to_normalized_tensor(img.crop((left, top, left + size, top + size)))
