"""The authors' multi-block sampler, re-stated from PAPER.md's description as the benchmark baseline.

Per image and per block, a Python loop draws the top-left corner with ``torch.randint(0, H - h)``
(the last row/column unreachable) and retries while the context block, minus the targets, keeps
``min_keep`` patches or fewer, relaxing the constraints after 20 failed tries; the block size uses
one random number for both scale and aspect ratio; counts are equalised by keeping the first k
indices in raster order. Used only to measure ours against; never by the library.
"""
from __future__ import annotations

import math

import torch


def _block_size(g: torch.Generator, H: int, W: int, scale, aspect) -> tuple[int, int]:
    r = torch.rand(1, generator=g).item()
    s = scale[0] + r * (scale[1] - scale[0])
    keep = int(H * W * s)
    a = aspect[0] + r * (aspect[1] - aspect[0])
    h, w = round(math.sqrt(keep * a)), round(math.sqrt(keep / a))
    while h >= H:
        h -= 1
    while w >= W:
        w -= 1
    return h, w


def _block(H: int, W: int, h: int, w: int, min_keep: int, constraints=None):
    tries, timeout = 0, 20
    while True:
        top = int(torch.randint(0, H - h, (1,)))
        left = int(torch.randint(0, W - w, (1,)))
        mask = torch.zeros(H, W, dtype=torch.int32)
        mask[top:top + h, left:left + w] = 1
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
    complement[top:top + h, left:left + w] = 0
    return idx.squeeze(), complement


def authors_masks(batch_size: int, step: int, H: int = 16, W: int = 16, npred: int = 4, min_keep: int = 10,
                  pred_scale=(0.15, 0.2), enc_scale=(0.85, 1.0), aspect=(0.75, 1.5)):
    """(context [B, Kc], targets [M, B, Kt]) as the authors' collator builds them."""
    g = torch.Generator().manual_seed(step)
    ph, pw = _block_size(g, H, W, pred_scale, aspect)
    eh, ew = _block_size(g, H, W, enc_scale, (1.0, 1.0))
    preds, ctxs = [], []
    keep_pred, keep_enc = H * W, H * W
    for _ in range(batch_size):
        masks_p, complements = [], []
        for _ in range(npred):
            m, c = _block(H, W, ph, pw, min_keep)
            masks_p.append(m)
            complements.append(c)
            keep_pred = min(keep_pred, len(m))
        preds.append(masks_p)
        m, _ = _block(H, W, eh, ew, min_keep, constraints=complements)
        keep_enc = min(keep_enc, len(m))
        ctxs.append(m)
    context = torch.stack([c[:keep_enc] for c in ctxs])
    targets = torch.stack([torch.stack([p[m][:keep_pred] for p in preds]) for m in range(npred)])
    return context, targets
