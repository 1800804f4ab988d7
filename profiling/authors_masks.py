"""The authors' multi-block mask sampler, re-stated from its description as a baseline.

Used only to time ours against (``profiling/bench_masks.py``) and to compare statistics in
``tests/test_masks.py``; never by the library. What it does, per batch:

- block sizes: ONE random number r per block kind sets both the scale and the aspect ratio
  (scale = lo + r (hi - lo), ratio likewise); keep = int(H W scale), h = round(sqrt(keep ratio)),
  w = round(sqrt(keep / ratio)), then decremented while h >= H (w >= W);
- per image, per target block, a Python loop draws the top-left corner with
  ``torch.randint(0, H - h)`` (so the last row and column are never covered) and retries while the
  block keeps ``min_keep`` patches or fewer; then the context block, constrained to the complements
  of the targets, retries likewise, dropping one constraint after every 20 failed tries (and
  spinning for ever when even the unconstrained block is too small, e.g. on a 2x2 grid);
- counts are equalised by keeping the first k indices in raster order.

One deliberate difference: the corners come from the batch's generator, not the global RNG, so the
baseline is reproducible and leaves the caller's RNG alone. It changes no statistic or cost.
"""

from __future__ import annotations

import math

import torch


def _block_size(g: torch.Generator, H: int, W: int, scale, aspect) -> tuple[int, int]:
    r = torch.rand(1, generator=g).item()  # one number for scale AND ratio (their quirk)
    s = scale[0] + r * (scale[1] - scale[0])
    keep = int(H * W * s)
    a = aspect[0] + r * (aspect[1] - aspect[0])
    h, w = round(math.sqrt(keep * a)), round(math.sqrt(keep / a))
    while h >= H:
        h -= 1
    while w >= W:
        w -= 1
    return h, w


def _block(g: torch.Generator, H: int, W: int, h: int, w: int, min_keep: int, constraints=None):
    """(indices of the kept patches, complement of the block [H, W]) for one block of one image."""
    tries, timeout = 0, 20
    while True:
        top = int(torch.randint(0, H - h, (1,), generator=g))
        left = int(torch.randint(0, W - w, (1,), generator=g))
        mask = torch.zeros(H, W, dtype=torch.int32)
        mask[top : top + h, left : left + w] = 1
        if constraints is not None:
            for k in range(max(len(constraints) - tries, 0)):
                mask *= constraints[k]
        idx = torch.nonzero(mask.flatten())
        if len(idx) > min_keep:
            break
        timeout -= 1
        if timeout == 0:
            tries, timeout = tries + 1, 20
    complement = torch.ones(H, W, dtype=torch.int32)
    complement[top : top + h, left : left + w] = 0
    return idx.squeeze(1), complement


def authors_masks(
    batch_size: int,
    step: int,
    H: int = 16,
    W: int = 16,
    npred: int = 4,
    min_keep: int = 10,
    pred_scale=(0.15, 0.2),
    enc_scale=(0.85, 1.0),
    aspect=(0.75, 1.5),
    allow_overlap: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [B, Kc], targets [M, B, Kt]) int64, as the authors' collator builds them."""
    g = torch.Generator().manual_seed(step)
    ph, pw = _block_size(g, H, W, pred_scale, aspect)
    eh, ew = _block_size(g, H, W, enc_scale, (1.0, 1.0))
    preds, ctxs = [], []
    keep_pred, keep_enc = H * W, H * W
    for _ in range(batch_size):
        masks_p, complements = [], []
        for _ in range(npred):
            m, c = _block(g, H, W, ph, pw, min_keep)
            masks_p.append(m)
            complements.append(c)
            keep_pred = min(keep_pred, len(m))
        preds.append(masks_p)
        m, _ = _block(g, H, W, eh, ew, min_keep, constraints=None if allow_overlap else complements)
        keep_enc = min(keep_enc, len(m))
        ctxs.append(m)
    context = torch.stack([c[:keep_enc] for c in ctxs])  # (B, Kc): the first Kc in raster order
    targets = torch.stack([torch.stack([p[m][:keep_pred] for p in preds]) for m in range(npred)])  # (M, B, Kt)
    return context, targets
