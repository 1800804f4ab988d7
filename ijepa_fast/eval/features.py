"""Frozen features of an encoder over a dataset, for linear probes and kNN.

Modes (``FEATURE_MODES``):
- ``avgpool``: the average over patches of the last layer's tokens after the final LayerNorm, i.e.
  ``encoder(images).mean(1)``: [B, D]. What the paper probes.
- ``last4``: the concatenation, oldest first, of the average-pooled tokens of the last four blocks:
  [B, 4D]. Each block's tokens pass through the encoder's final LayerNorm before pooling (as DINO's
  and timm's intermediate-layer features do), so the four parts are on one scale and the last part
  equals ``avgpool``. They come from the encoder's own pass (``VisionTransformer.forward_layers``).

Images may have another size than the training size (a multiple of the patch): the encoder
resamples its position embeddings to their grid.

Extraction is batched, under ``torch.no_grad`` and in eval mode (the model's mode is restored
afterwards), with bf16 autocast by default where the device has native bf16
(``device.resolve_precision``), and shows a tqdm progress bar. ``extract_tokens`` keeps the last
layer's tokens [N, T, D] instead, for the attentive probe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ijepa_fast.runtime.device import autocast, resolve_precision

FEATURE_MODES = ("avgpool", "last4")


def feature_dim(encoder: nn.Module, mode: str = "avgpool") -> int:
    return encoder.embed_dim * (4 if mode == "last4" else 1)


def encode(encoder: nn.Module, images: torch.Tensor, mode: str = "avgpool") -> torch.Tensor:
    """images [B, 3, H, W] -> features [B, D] (avgpool) or [B, 4D] (last4), float32."""
    if mode == "avgpool":
        return encoder(images).float().mean(1)  # (B, N, D) -> (B, D)
    if mode != "last4":
        raise ValueError(f"feature mode {mode!r}: choose one of {FEATURE_MODES}")
    if len(encoder.blocks) < 4:
        raise ValueError(f"last4 features need at least 4 blocks, the encoder has {len(encoder.blocks)}")
    parts = encoder.forward_layers(images, last=4)  # 4 x (B, N, D), oldest first
    return torch.cat([t.float().mean(1) for t in parts], dim=1)  # (B, 4D)


def _batches(dataset: Any, batch_size: int, num_workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images [b, 3, S, S], labels [b]) batches of a map-style dataset (via a DataLoader), a pair of
    tensors (images, labels), or any iterable of (image, label) pairs."""
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and all(isinstance(t, torch.Tensor) for t in dataset):
        images, labels = dataset
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size], torch.as_tensor(labels[i : i + batch_size])
        return
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, persistent_workers=False
        )
        for images, labels in loader:
            yield images, torch.as_tensor(labels)
        return
    images, labels = [], []
    for image, label in dataset:
        images.append(torch.as_tensor(image))
        labels.append(int(label))
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)


def _length(dataset: Any) -> int | None:
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and isinstance(dataset[0], torch.Tensor):
        return len(dataset[0])
    try:
        return len(dataset)
    except TypeError:
        return None


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    dataset: Iterable | tuple[torch.Tensor, torch.Tensor],
    mode: str = "avgpool",
    batch_size: int = 256,
    num_workers: int = 0,
    dtype: str = "auto",
    progress: bool = True,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, F] (float32, CPU) and labels [N] (int64) of every image of ``dataset``.

    ``dataset``: a map-style dataset of (image [3, S, S] normalised, label), e.g.
    ``ijepa_fast.data.evaluation.build_eval_dataset``, a pair of tensors (images [N, 3, S, S], labels
    [N]), or any iterable of (image, label). The encoder runs where its parameters are; ``dtype``:
    ``auto`` (see ``device.resolve_precision``), ``bf16`` or ``fp32`` (autocast). ``mode``: see the module
    docstring.
    """
    if mode not in FEATURE_MODES:
        raise ValueError(f"feature mode {mode!r}: choose one of {FEATURE_MODES}")
    feats, labels = _run_frozen(
        encoder, dataset, lambda images: encode(encoder, images, mode), batch_size, num_workers, dtype, progress, desc
    )
    if not feats:
        return torch.empty(0, feature_dim(encoder, mode)), torch.empty(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def extract_tokens(
    encoder: nn.Module,
    dataset: Iterable | tuple[torch.Tensor, torch.Tensor],
    batch_size: int = 256,
    num_workers: int = 0,
    dtype: str = "auto",
    progress: bool = True,
    desc: str = "tokens",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last layer's normed patch tokens [N, T, D] (float32, CPU) and labels [N] of every image of
    ``dataset`` (as ``extract_features``), for the attentive probe; ``tokens.mean(1)`` is ``avgpool``."""
    tokens, labels = _run_frozen(
        encoder, dataset, lambda images: encoder(images).float(), batch_size, num_workers, dtype, progress, desc
    )
    if not tokens:
        return torch.empty(0, encoder.num_patches, encoder.embed_dim), torch.empty(0, dtype=torch.int64)
    return torch.cat(tokens), torch.cat(labels)


def _run_frozen(
    encoder: nn.Module,
    dataset: Any,
    fn: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    num_workers: int,
    dtype: str,
    progress: bool,
    desc: str,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """([fn(images) on the CPU per batch], [labels per batch]) in eval mode under ``dtype``'s autocast,
    the encoder's mode restored afterwards."""
    from ijepa_fast.runtime.progress import ProgressBar

    device = next(encoder.parameters()).device
    outputs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    was_training = encoder.training
    encoder.eval()
    try:
        with (
            ProgressBar(total=_length(dataset), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar,
            autocast(device, resolve_precision(device, dtype, option="dtype").autocast_dtype),
        ):
            for images, y in _batches(dataset, batch_size, num_workers):
                outputs.append(fn(images.to(device, non_blocking=True)).cpu())
                labels.append(y.to(torch.int64).reshape(-1))
                bar.update(len(y))
    finally:
        encoder.train(was_training)
    return outputs, labels
