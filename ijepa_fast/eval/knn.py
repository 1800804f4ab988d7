"""Weighted k-nearest-neighbour classification on frozen features (DINO's protocol).

Features are L2-normalised, so the dot product is the cosine similarity. Each test sample takes its
k most similar train samples; neighbour j votes for its class with weight exp(s_j / T). Defaults:
k = 20, T = 0.07. The similarity matrix is never held whole: test samples go in chunks, and for
each chunk the train set is scanned in chunks while a running top-k is kept, so memory is
O(test_chunk x (train_chunk + k)) whatever the dataset size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# 2^24 similarities per (test chunk x train chunk) block: 64 MiB in fp32.
BLOCK_ELEMENTS = 1 << 24


@dataclass
class KnnResult:
    top1: float  # in [0, 1]
    k: int
    temperature: float
    seconds: float

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@torch.no_grad()
def knn_topk(
    train_x: torch.Tensor, test_x: torch.Tensor, k: int, test_chunk: int = 1024, train_chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities [M, k], train indices [M, k]) of each test row's k nearest train rows by cosine
    similarity, most similar first. train_x [N, D], test_x [M, D]."""
    dt = train_x.dtype if train_x.dtype == torch.float64 else torch.float32
    train = F.normalize(train_x.to(dt), dim=1)
    test = F.normalize(test_x.to(train.device, dt), dim=1)
    N, M = len(train), len(test)
    k = min(k, N)
    train_chunk = train_chunk or max(k, BLOCK_ELEMENTS // max(test_chunk, 1))
    sims_out = torch.empty(M, k, dtype=train.dtype, device=train.device)
    idx_out = torch.empty(M, k, dtype=torch.int64, device=train.device)
    for i in range(0, M, test_chunk):
        q = test[i : i + test_chunk]  # (m, D)
        best_s = torch.full((len(q), 0), float("-inf"), dtype=train.dtype, device=train.device)
        best_i = torch.empty(len(q), 0, dtype=torch.int64, device=train.device)
        for j in range(0, N, train_chunk):
            s = q @ train[j : j + train_chunk].T  # (m, n)
            kk = min(k, s.shape[1])
            cs, ci = s.topk(kk, dim=1)
            # merge with the running best: k + kk candidates -> k
            cand_s = torch.cat([best_s, cs], dim=1)
            cand_i = torch.cat([best_i, ci + j], dim=1)
            keep = min(k, cand_s.shape[1])
            best_s, pos = cand_s.topk(keep, dim=1)
            best_i = cand_i.gather(1, pos)
        sims_out[i : i + len(q)] = best_s
        idx_out[i : i + len(q)] = best_i
    return sims_out, idx_out


@torch.no_grad()
def knn_predict(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    test_chunk: int = 1024,
    train_chunk: int | None = None,
) -> torch.Tensor:
    """Predicted class [M] of each test row: argmax over classes of sum_j exp(s_j / T) over its k
    nearest train rows (cosine similarity s_j)."""
    if len(train_x) != len(train_y):
        raise ValueError(f"train features {tuple(train_x.shape)} and labels {tuple(train_y.shape)} differ in length")
    if temperature <= 0 or k < 1:
        raise ValueError(f"k={k} must be >= 1 and temperature={temperature} > 0")
    train_y = train_y.to(train_x.device, torch.int64)
    C = num_classes or int(train_y.max().item()) + 1
    sims, idx = knn_topk(train_x, test_x, k, test_chunk, train_chunk)  # (M, k)
    weights = (sims / temperature).exp()  # (M, k)
    votes = torch.zeros(len(test_x), C, dtype=weights.dtype, device=weights.device)
    votes.scatter_add_(1, train_y[idx], weights)  # (M, C)
    return votes.argmax(1)


@torch.no_grad()
def knn_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    device: str | torch.device | None = None,
    **kwargs,
) -> KnnResult:
    """Top-1 of ``knn_predict`` on (test_x, test_y), computed on ``device`` (default: train_x's)."""
    started = time.perf_counter()
    device = torch.device(device) if device is not None else train_x.device
    num_classes = int(max(train_y.max().item(), test_y.max().item() if len(test_y) else 0)) + 1
    pred = knn_predict(
        train_x.to(device), train_y.to(device), test_x.to(device), k, temperature, num_classes=num_classes, **kwargs
    )
    top1 = (pred.cpu() == test_y.cpu()).float().mean().item() if len(test_y) else float("nan")
    return KnnResult(top1=top1, k=k, temperature=temperature, seconds=time.perf_counter() - started)
