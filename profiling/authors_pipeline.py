"""The authors' CPU data pipeline, re-stated in PIL and torch (torchvision is not installed beside the
CPU torch here), as the baseline of ``profiling/bench_loader.py`` and the reference crop sampler of
``tests/test_decode.py``. Never used by the library.

What the authors run per image and per batch (facebookresearch/ijepa):

- ``src/datasets/imagenet1k.py``: ``ImageNet`` is a torchvision ``ImageFolder``; its loader opens the
  file and returns ``Image.open(f).convert("RGB")`` (torchvision ``datasets/folder.py``,
  ``pil_loader``): the whole image decoded at full size.
- ``src/transforms.py``, ``make_transforms``: ``RandomResizedCrop(crop_size, scale=crop_scale)``,
  then ``RandomHorizontalFlip()`` when ``horizontal_flip``, then ``ToTensor()`` and
  ``Normalize(mean, std)`` (color distortion and blur are off in every config of theirs).
  torchvision's ``RandomResizedCrop.get_params``: ten tries of area ~ U(scale) x image area and
  log-aspect ~ U(log 3/4, log 4/3) from torch's global generator, ``w = round(sqrt(area x aspect))``,
  ``h = round(sqrt(area / aspect))``, corner ``randint(0, H - h + 1)``, ``randint(0, W - w + 1)``;
  else the centred crop clamped to the ratio range. ``F.resized_crop`` on a PIL image is
  ``img.crop(box)`` then ``img.resize(size, BILINEAR)``. ``RandomHorizontalFlip``: ``torch.rand(1)
  < 0.5`` then ``transpose(FLIP_LEFT_RIGHT)``. ``ToTensor``: HWC uint8 -> CHW contiguous ->
  float / 255. ``Normalize``: a clone, then ``sub_(mean).div_(std)`` per image.
- ``src/masks/multiblock.py``, ``MaskCollator.__call__``: ``default_collate`` of the (image,
  label) pairs (a stack of the float images), then the masks (``profiling/authors_masks.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from profiling.authors_masks import authors_masks

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
RATIO = (3 / 4, 4 / 3)


def pil_loader(path: str) -> Image.Image:
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def get_params(width: int, height: int, scale, ratio=RATIO, g: torch.Generator | None = None):
    """(top, left, h, w) of torchvision's RandomResizedCrop, drawn from ``g`` (default: torch's)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect_ratio = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g).item())
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=g).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=g).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(img: Image.Image, size: int, scale, g: torch.Generator | None = None) -> Image.Image:
    i, j, h, w = get_params(img.width, img.height, scale, g=g)
    return img.crop((j, i, j + w, i + h)).resize((size, size), Image.Resampling.BILINEAR)


def random_horizontal_flip(img: Image.Image, g: torch.Generator | None = None) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if torch.rand(1, generator=g) < 0.5 else img


def to_tensor(pic: Image.Image) -> torch.Tensor:
    img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
    img = img.view(pic.size[1], pic.size[0], 3).permute((2, 0, 1)).contiguous()
    return img.to(dtype=torch.get_default_dtype()).div(255)


def normalize(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    mean = torch.as_tensor(MEAN, dtype=tensor.dtype)
    std = torch.as_tensor(STD, dtype=tensor.dtype)
    return tensor.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


class AuthorsDataset:
    """``ds[i] -> (image [3, S, S] float32, label)``: ImageFolder with the authors' transforms."""

    def __init__(self, paths, labels, crop_size: int = 224, crop_scale=(0.3, 1.0), flip: bool = True):
        self.paths, self.labels = list(map(str, paths)), list(labels)
        self.crop_size, self.crop_scale, self.flip = crop_size, crop_scale, flip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = random_resized_crop(pil_loader(self.paths[i]), self.crop_size, self.crop_scale)
        if self.flip:
            img = random_horizontal_flip(img)
        return normalize(to_tensor(img)), self.labels[i]


class AuthorsCollator:
    """MaskCollator: default_collate of the samples, then the multi-block masks of the batch."""

    def __init__(self, grid: int = 16, **mask_kwargs):
        self.grid, self.mask_kwargs, self.count = grid, mask_kwargs, -1

    def __call__(self, batch: list[tuple[torch.Tensor, int]]):
        images = torch.stack([b[0] for b in batch])  # default_collate of the images
        labels = torch.tensor([b[1] for b in batch])
        self.count += 1
        context, targets = authors_masks(len(batch), self.count, self.grid, self.grid, **self.mask_kwargs)
        return (images, labels), context, targets
