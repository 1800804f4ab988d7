"""Batches from the host to the training device (``speed.uint8_input``).

With ``speed.uint8_input`` the PyTorch loader hands uint8 images [B, C, S, S] (a quarter of float32's
bytes: 19 MB instead of 77 MB for a ViT-H/14 batch of 128 at 224 px) and they are normalised on the
device by ``transforms.normalize``, the same operations on the same values as the loader's own
normalisation: the float32 results are identical bit for bit (each op is IEEE-rounded on both).

On CUDA, ``DeviceFeed`` copies batch i + 1 on a side stream while the compute stream runs step i:
each batch is staged (copied, and normalised when uint8) on the side stream as soon as the one
before it is handed out, the compute stream waits for it on the device (no host sync), and the
batch's tensors are recorded on the compute stream so their memory is not reused before it is done
with them. Elsewhere there is no stream to overlap with: each batch is copied (a no-op on the CPU)
and normalised as it is handed out, in order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import torch

from ijepa_fast.data.loader import Batch
from ijepa_fast.data.transforms import normalization_stats, normalize


def batch_to_device(batch: Batch, device: torch.device, stats: tuple | None = None) -> Batch:
    """``batch`` on ``device`` (non-blocking copies), its uint8 images normalised there to float32;
    ``stats``: ``normalization_stats(device)``, made once by a caller that calls this every step."""
    batch = batch.to(device, non_blocking=True)
    if batch.images.dtype == torch.uint8:
        batch = dataclasses.replace(batch, images=normalize(batch.images, stats))
    return batch


def _tensors(batch: Batch) -> list[torch.Tensor]:
    return [batch.images, batch.labels, batch.masks.context, batch.masks.targets]


class DeviceFeed:
    """``for batch in DeviceFeed(loader, device)``: the loader's ``Batch``es on ``device``, images
    float32 and normalised (uint8 ones are normalised on the device). ``side_stream`` (default: on
    CUDA devices) stages each batch one ahead on a side stream."""

    def __init__(self, batches: Iterable[Batch], device: torch.device, side_stream: bool | None = None):
        self.batches = batches
        self.device = torch.device(device)
        self.side_stream = self.device.type == "cuda" if side_stream is None else side_stream

    def __iter__(self) -> Iterator[Batch]:
        stats = normalization_stats(self.device)  # once per iteration, outside the loop
        if not self.side_stream:
            return (batch_to_device(b, self.device, stats) for b in self.batches)
        return self._ahead(stats)

    def _ahead(self, stats: tuple) -> Iterator[Batch]:
        stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        host = iter(self.batches)

        def stage() -> Batch | None:
            nxt = next(host, None)
            if nxt is None:
                return None
            with torch.cuda.stream(stream):
                return batch_to_device(nxt, self.device, stats)

        staged = stage()
        while staged is not None:
            compute.wait_stream(stream)  # on the device: the step starts once its batch has landed
            for t in _tensors(staged):
                t.record_stream(compute)  # allocated on the side stream, used on the compute stream
            ready, staged = staged, stage()  # the next copy is queued before this batch is handed out
            yield ready
