"""The pretraining view straight from a file's bytes: the crop box drawn on the header's size, then a
JPEG decoded at the smallest DCT scale that still covers the crop at the output resolution.

Why: decoding is most of a CPU loader's cost, and a RandomResizedCrop shrinks its crop anyway. A
JPEG decoder can return the image at 1/2, 1/4 or 1/8 of its size for a fraction of the work (the
inverse DCT computed on fewer coefficients). ``random_resized_crop_bytes``:

1. reads the image size from the header (no pixels decoded);
2. draws the crop box on that size with ``transforms.crop_box`` and the sample's generator, so the
   box is exactly the one the full-decode path draws (the same numbers from the same ``rng``);
3. picks the largest reduction k in (8, 4, 2, 1) with crop width / k >= size and crop height / k
   >= size, so the decoded crop still holds at least ``size`` x ``size`` pixels and the final
   resample only shrinks (antialiased bilinear, as the full-decode path);
4. decodes at 1/k (simplejpeg when it is installed, else Pillow's ``draft``), scales the box by the
   decoded size over the header size, cuts it out and resamples it to ``size`` x ``size``
   (``transforms.crop_then_resize``: the authors' crop, then resize; simplejpeg's RGBX output
   mapped as an RGB image without a copy, so the resample computes three channels, not four);
5. flips left-right when asked (one more draw from ``rng``, after the box) and returns uint8.

The resample of a whole-pixel box (k = 1, most crops of ImageNet-sized images) from simplejpeg's
output runs in torch's uint8 antialiased bilinear kernel where it is vectorised (``fast_resample``:
x86 with AVX2 or AVX-512), faster than Pillow's there (``profiling/bench_loader.py``). This is a
difference from the authors' pixels, made on purpose: torch's fixed-point rounding puts a few
percent of values 1 away from Pillow's (out of 255), never more (tested).

The reduced-scale decode (k > 1: crops at least twice the output size on both sides, rare on
ImageNet-sized images, common on large photos) is the other, also on purpose: the DCT's own
downscale is a different low-pass from Pillow's bilinear over the full decode, so single pixels can
move further than the mean difference, which the tests bound below 1.5 of 255. ``reduce=False``
with ``resample="pillow"`` (``data.exact_pixels``) gives the authors' pixels exactly, at the full
decode's cost.

Files that are not baseline/progressive RGB or greyscale JPEGs (PNG, WebP, CMYK JPEGs), and a JPEG
the fast decoder refuses, go through ``folder.load_rgb`` (the full decode with every mode
conversion), with the same box. A damaged file raises from here as from ``load_rgb``.
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ijepa_fast.data.folder import load_rgb
from ijepa_fast.data.transforms import CROP_RATIO, Box, crop_box, crop_then_resize, pil_to_uint8, random_flip
from ijepa_fast.runtime.optional import available, require

REDUCTIONS = (8, 4, 2, 1)  # the DCT scales 1/k that libjpeg decodes at the cost of fewer coefficients
_JPEG_START = b"\xff\xd8"


def reduction(box: Box, size: int) -> int:
    """The largest k of ``REDUCTIONS`` with the box's sides / k >= ``size`` (1 when none is)."""
    _, _, w, h = box
    return next(k for k in REDUCTIONS if k == 1 or (w / k >= size and h / k >= size))


def _scaled(box: Box, full: tuple[int, int], decoded: tuple[int, int]) -> tuple[float, float, float, float]:
    """``box`` on the full image, in the pixel coordinates of its decoded (reduced) copy."""
    sx, sy = decoded[0] / full[0], decoded[1] / full[1]
    left, top, w, h = box
    return left * sx, top * sy, w * sx, h * sy


def _simplejpeg_header(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, colorspace) of a JPEG read by simplejpeg, or None when it cannot read it."""
    if not data.startswith(_JPEG_START):
        return None
    try:
        height, width, colorspace, _ = require("simplejpeg", "the fast JPEG decode").decode_jpeg_header(data)
    except ValueError:  # Pillow reads it, or names what is wrong with it
        return None
    return width, height, colorspace


def _decode_simplejpeg(data: bytes, k: int, header: tuple[int, int, str]) -> np.ndarray | None:
    """The [H, W, 4] RGBX array at scale 1/k, or None when simplejpeg cannot take this file."""
    width, height, colorspace = header
    if colorspace not in ("Gray", "YCbCr", "RGB"):  # CMYK / YCCK: load_rgb converts them
        return None
    try:
        # libjpeg's smallest M/8 scale whose output is at least this size is exactly 1/k here.
        arr = require("simplejpeg", "the fast JPEG decode").decode_jpeg(
            data, colorspace="RGBX", min_height=-(-height // k), min_width=-(-width // k)
        )
    except ValueError:  # damaged: load_rgb decides (and names the error)
        return None
    return arr


def fast_resample() -> str:
    """How the fast path resamples a whole-pixel box from simplejpeg's output: ``torch`` where torch's
    uint8 antialiased resize is vectorised (x86 with AVX2 or AVX-512), else ``pillow``."""
    return "torch" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "pillow"


def _resample_rgbx(arr: np.ndarray, box: Box, size: int) -> torch.Tensor:
    """[3, size, size] uint8 (a view) of the whole-pixel ``box`` of an [H, W, 4] RGBX array, cut
    out, then resampled by torch's antialiased bilinear (within 1 of Pillow's; see the module
    docstring). Four channels in: the layout the uint8 kernel takes without a repack."""
    left, top, w, h = box
    region = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)[:, :, top : top + h, left : left + w]
    return F.interpolate(region, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0, :3]


def _rgb_over(arr: np.ndarray) -> Image.Image:
    """An RGB image over an [H, W, 4] RGBX array's memory, no copy (RGBX where Pillow lacks the map).

    Pillow keeps an RGB image 4 bytes a pixel, the fourth unused, so RGBX bytes already are one.
    Its public ``frombuffer`` maps them only as an RGBX image, whose resample computes all four
    channels: about a fifth more resample work than RGB, for the same first three channels."""
    h, w = arr.shape[:2]
    try:
        img = Image.new("RGB", (0, 0))._new(Image.core.map_buffer(arr, (w, h), "raw", 0, ("RGB", 4 * w, 1)))
    except (AttributeError, TypeError, ValueError):  # a Pillow without this internal map
        return Image.frombuffer("RGBX", (w, h), arr, "raw", "RGBX", 0, 1)
    img.readonly = 1  # the array's memory: Pillow copies before any change in place
    return img


class _Bytes(io.BytesIO):
    """An encoded image that Pillow's errors name by ``name`` (its path), not by object address, so
    the same bad file gives the same message every time."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __repr__(self) -> str:
        return repr(self.name)


def _decode_pil(data: bytes, k: int, name: str) -> Image.Image | None:
    """The RGB image at scale 1/k (Pillow's draft), or None for files other than RGB/L JPEGs."""
    img = Image.open(_Bytes(data, name))
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None
    if k > 1:
        img.draft(img.mode, (img.width // k, img.height // k))
    img.load()  # a truncated file fails here, as in load_rgb
    return img if img.mode == "RGB" else img.convert("RGB")


def header_size(data: bytes, name: str = "the image", decoder: str = "pillow") -> tuple[int, int]:
    """(width, height) from the file's header, no pixels decoded; errors name the file as ``name``.
    ``decoder="simplejpeg"`` reads a JPEG's header with it (a fraction of Pillow's parse)."""
    header = _simplejpeg_header(data) if decoder == "simplejpeg" else None
    if header is not None:
        return header[0], header[1]
    with Image.open(_Bytes(data, name)) as img:
        return img.size


def _to_uint8(view: Image.Image) -> torch.Tensor:
    """[3, S, S] uint8 (contiguous) of an RGB, L or RGBX view (RGBX: its first three channels)."""
    if view.mode != "RGBX":
        return pil_to_uint8(view)
    return torch.from_numpy(np.asarray(view)[..., :3].transpose(2, 0, 1).copy())  # contiguous, writable


def fast_decoder() -> str:
    """The JPEG decoder the fast path uses: ``simplejpeg`` when it is installed, else ``pillow``."""
    return "simplejpeg" if available("simplejpeg") else "pillow"


def random_resized_crop_bytes(
    data: bytes,
    size: int,
    scale: tuple[float, float],
    rng: random.Random,
    flip: bool = False,
    ratio: tuple[float, float] = CROP_RATIO,
    decoder: str | None = None,
    name: str = "the image",
    resample: str | None = None,
    reduce: bool = True,
) -> torch.Tensor:
    """The pretraining view of an encoded image: [3, size, size] uint8 (see the module docstring).

    ``flip``: mirror left-right with probability 1/2 (drawn from ``rng`` after the box).
    ``decoder``: ``simplejpeg`` | ``pillow`` (default: ``fast_decoder()``). ``name``: what errors
    call the file (its path). ``resample``: ``torch`` | ``pillow`` for a whole-pixel box decoded by
    simplejpeg (default: ``fast_resample()``); every other view is resampled by Pillow.
    ``reduce=False``: always decode at full scale.
    """
    decoder = decoder or fast_decoder()
    header = _simplejpeg_header(data) if decoder == "simplejpeg" else None  # read once, used twice
    full = header[:2] if header is not None else header_size(data, name)
    box = crop_box(*full, scale, ratio, rng)
    k, decoded = (reduction(box, size) if reduce else 1), None
    if header is not None:
        arr = _decode_simplejpeg(data, k, header)
        if arr is not None and k == 1 and (resample or fast_resample()) == "torch":
            view = _resample_rgbx(arr, box, size)
            return (view.flip(-1) if flip and rng.random() < 0.5 else view).contiguous()  # random_flip's draw
        decoded = None if arr is None else _rgb_over(arr)
    elif decoder != "simplejpeg" and data.startswith(_JPEG_START):
        decoded = _decode_pil(data, k, name)
    if decoded is None:
        view = crop_then_resize(load_rgb(_Bytes(data, name)), box, size)
    else:
        view = crop_then_resize(decoded, _scaled(box, full, decoded.size), size)
    return _to_uint8(random_flip(view, rng) if flip else view)
