"""The DALI graphs: decode only the crop, resize, normalise to CHW, on the GPU or the CPU.

``device_id=None`` builds a CPU-only pipeline (DALI's CPU mode: CI and machines without a GPU);
otherwise decoding is ``mixed`` (nvJPEG and, on A100/H100, the hardware JPEG decoder; the host
parses the bitstream) and resize/normalise run on the GPU. DALI is imported here, lazily, through
``ijepa_fast.runtime.optional``.
"""

from __future__ import annotations

from ijepa_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ijepa_fast.runtime.optional import require

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range, as the CPU path
READER_NAME = "wds"


def dali():
    """(nvidia.dali, fn, types), or the install hint as an error."""
    module = require("dali", "the DALI data loader (data.loader=dali)")
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    return module, fn, types


def _normalise(fn, types, images, crop_size: int, half: bool):
    """Resize to crop_size x crop_size (bilinear with antialiasing, like PIL's BILINEAR resize) and
    normalise to CHW float with the ImageNet mean/std (on the 0-255 scale)."""
    images = fn.resize(images, resize_x=crop_size, resize_y=crop_size, interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT16 if half else types.FLOAT,
        output_layout="CHW",
        mean=[255 * m for m in IMAGENET_MEAN],
        std=[255 * s for s in IMAGENET_STD],
    )


def _decoder_args(types, device_id: int | None) -> dict:
    # adjust_orientation=False: the CPU path (PIL) ignores EXIF orientation, and the crop windows
    # are computed on the stored size. jpeg_fancy_upsampling: the GPU decoder upsamples chroma as
    # libjpeg-turbo does (PIL's default), so GPU, DALI-CPU and PIL outputs agree.
    args = {"device": "cpu" if device_id is None else "mixed", "output_type": types.RGB, "adjust_orientation": False}
    if device_id is not None:
        args["jpeg_fancy_upsampling"] = True
    return args


def folder_pipeline(
    source,
    *,
    batch_size: int,
    threads: int,
    device_id: int | None,
    prefetch: int,
    seed: int,
    crop_size: int,
    half: bool,
):
    """Images from a Python source that returns, per step, the encoded files, their crop windows
    ([x, y] and [w, h] in pixels: ``fn.decoders.image_slice`` decodes only that region) and labels.
    Outputs: images [B, 3, S, S], labels [B] (on the GPU when ``device_id`` is set)."""
    module, fn, types = dali()
    pipe = module.Pipeline(
        batch_size=batch_size, num_threads=threads, device_id=device_id, prefetch_queue_depth=prefetch, seed=seed
    )
    with pipe:
        data, anchor, shape, labels = fn.external_source(
            source=source,
            num_outputs=4,
            batch=True,
            batch_info=True,
            dtype=[types.UINT8, types.INT32, types.INT32, types.INT64],
            ndim=[1, 1, 1, 0],
        )
        images = fn.decoders.image_slice(data, anchor, shape, **_decoder_args(types, device_id))
        images = _normalise(fn, types, images, crop_size, half)
        pipe.set_outputs(images, labels if device_id is None else labels.gpu())
    return pipe


def webdataset_pipeline(
    tars: list[str],
    index_paths: list[str],
    *,
    batch_size: int,
    threads: int,
    device_id: int | None,
    prefetch: int,
    seed: int,
    crop_size: int,
    crop_scale: tuple[float, float],
    half: bool,
    shard_id: int,
    num_shards: int,
    initial_fill: int,
):
    """Images from webdataset tars through DALI's reader, sharded and shuffled by it, cropped by
    ``fn.decoders.image_random_crop`` (RandomResizedCrop semantics: area ~ U(crop_scale), log aspect
    ratio ~ U(log 3/4, log 4/3), 10 attempts; DALI's RNG). Outputs: images [B, 3, S, S] and the
    ``.cls`` bytes [B, L] (uint8 ASCII, zero padded; parsed on the torch side).

    Sharding (see ``loader.py``): with shards of equal size, ``pad_last_batch=True``,
    ``stick_to_shard=True`` and the iterator's ``LastBatchPolicy.DROP``, every rank runs the same
    number of full batches per epoch and never sees a sample twice within one.
    """
    module, fn, types = dali()
    pipe = module.Pipeline(
        batch_size=batch_size, num_threads=threads, device_id=device_id, prefetch_queue_depth=prefetch, seed=seed
    )
    with pipe:
        encoded, cls = fn.readers.webdataset(
            paths=tars,
            index_paths=index_paths,
            ext=["img", "cls"],
            missing_component_behavior="empty",
            random_shuffle=True,
            initial_fill=initial_fill,
            seed=seed,
            shard_id=shard_id,
            num_shards=num_shards,
            pad_last_batch=True,
            stick_to_shard=True,
            prefetch_queue_depth=prefetch,
            name=READER_NAME,
        )
        images = fn.decoders.image_random_crop(
            encoded,
            random_area=list(crop_scale),
            random_aspect_ratio=list(RATIO),
            num_attempts=10,
            seed=seed + 1,
            **_decoder_args(types, device_id),
        )
        images = _normalise(fn, types, images, crop_size, half)
        cls = fn.pad(cls, fill_value=0, axes=(0,))  # to the longest label of the batch: a dense tensor
        pipe.set_outputs(images, cls if device_id is None else cls.gpu())
    return pipe


class DecodeCheck:
    """Does DALI's own decoder (the loader's, on its device) accept each of some encoded files?
    Used after a pipeline error to find the file responsible when PIL accepts them all."""

    def __init__(self, device_id: int | None):
        self.device_id = device_id
        self._pipe = None

    def _build(self):
        module, fn, types = dali()
        pipe = module.Pipeline(
            batch_size=1,
            num_threads=1,
            device_id=self.device_id,
            prefetch_queue_depth=1,
            exec_async=False,
            exec_pipelined=False,
        )
        with pipe:
            data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
            pipe.set_outputs(fn.decoders.image(data, **_decoder_args(types, self.device_id)))
        pipe.build()
        return pipe

    def __call__(self, encoded) -> str:
        """'' when DALI decodes ``encoded`` (a uint8 numpy array), else the error's first line."""
        if self._pipe is None:
            self._pipe = self._build()
        try:
            self._pipe.feed_input("data", [encoded])
            self._pipe.run()
        except Exception as err:  # a decoder error leaves the pipeline unusable: rebuild next time
            self._pipe = None
            return f"DALI decoder: {_cause(str(err))}"
        return ""


def _cause(message: str) -> str:
    """The line of a DALI pipeline error that names the cause (after "encountered:")."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for i, line in enumerate(lines[:-1]):
        if line.startswith("encountered"):
            return lines[i + 1]
    return lines[-1] if lines else "error"
