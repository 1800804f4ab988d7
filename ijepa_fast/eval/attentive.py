"""Attentive probe: a cross-attention pooling head trained on frozen patch tokens (V-JEPA's protocol).

Where the linear probe sees the average of the tokens, this head learns where to look:

    x = LayerNorm(tokens)                                  # [B, N, D]
    k, v = x Wk + bk, x Wv + bv                            # [B, N, D] each, split into H heads
    a_h = softmax(q_h . k_h / sqrt(D / H))  over N         # q: a learned query, one per head
    pooled = concat_h (a_h v_h)                            # [B, D]
    logits = pooled W + b                                  # [B, K]

It is trained with AdamW on cross-entropy, a cosine learning-rate decay, on the tokens' device;
the encoder stays frozen (its tokens are extracted once, see ``features.extract_tokens``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ijepa_fast.eval.probe import cpu_threads

DEFAULT_EPOCHS = 20
# A small training set (a low-shot subset) still gets this many AdamW steps.
MIN_STEPS = 200
# The attention starts near uniform (small query and keys), so the head needs a brisk rate to find
# where to look within MIN_STEPS: at 1e-3 it stayed at chance on the synthetic tokens of
# tests/test_eval.py, whose label only an attending head can read.
DEFAULT_LR = 1e-2
DEFAULT_WD = 1e-2
DEFAULT_BATCH_SIZE = 256


class AttentiveProbe(nn.Module):
    """tokens [B, N, D] -> logits [B, K]: learned-query multi-head cross-attention, then linear."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 8):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"the attentive probe needs at least 1 head, not {num_heads}")
        if dim % num_heads:
            raise ValueError(f"the attentive probe's {num_heads} heads do not divide the width {dim}")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(num_heads, dim // num_heads))
        self.norm = nn.LayerNorm(dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.query, std=0.02)
        nn.init.trunc_normal_(self.kv.weight, std=0.02)
        nn.init.zeros_(self.kv.bias)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, D] -> pooled [B, D]."""
        B, N, D = tokens.shape
        H = self.num_heads
        k, v = self.kv(self.norm(tokens)).view(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4)  # (2, B, H, N, D/H)
        q = self.query.to(k.dtype)[None, :, None, :].expand(B, H, 1, D // H)  # (B, H, 1, D/H)
        pooled = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, D/H)
        return pooled.reshape(B, D)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(tokens))


@dataclass
class AttentiveResult:
    top1: float  # test top-1 in [0, 1]
    train_top1: float
    num_classes: int
    num_heads: int
    steps: int
    lr: float
    weight_decay: float
    batch_size: int
    seconds: float
    pooling: str = "attentive: a learned query's multi-head cross-attention over the last layer's patch tokens"

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def fit_attentive_probe(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    num_heads: int = 8,
    epochs: int = DEFAULT_EPOCHS,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WD,
    batch_size: int = DEFAULT_BATCH_SIZE,
    steps: int | None = None,
    seed: int = 0,
) -> tuple[AttentiveProbe, int]:
    """(probe trained on tokens [N, T, D] with labels [N], steps taken), on the tokens' device.

    ``steps`` AdamW steps (default ``max(MIN_STEPS, epochs x batches per epoch)``) on shuffled
    mini-batches (seeded), learning rate decaying to 0 along a cosine.
    """
    n, _, D = tokens.shape
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = AttentiveProbe(D, num_classes, num_heads).to(tokens.device)
    B = min(batch_size, n)
    steps = steps or max(MIN_STEPS, epochs * math.ceil(n / B))
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    labels = labels.to(tokens.device, torch.int64)
    order, pos = torch.randperm(n, generator=gen), 0
    probe.train()
    with cpu_threads(tokens.device, 6 * B * tokens.shape[1] * D * 2 * D):  # kv projection, forward and backward
        for _ in range(steps):
            if pos + B > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos : pos + B].to(tokens.device)
            pos += B
            loss = F.cross_entropy(probe(tokens[idx].float()), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return probe.eval(), steps


@torch.no_grad()
def probe_top1(probe: AttentiveProbe, tokens: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 of ``probe`` on tokens [N, T, D] with labels [N], in batches."""
    if not len(labels):
        return float("nan")
    correct = torch.zeros((), dtype=torch.int64, device=tokens.device)
    for i in range(0, len(tokens), batch_size):
        pred = probe(tokens[i : i + batch_size].float()).argmax(1)
        correct += (pred == labels[i : i + batch_size].to(pred.device)).sum()
    return correct.item() / len(labels)


def attentive_probe(
    train_tokens: torch.Tensor,
    train_y: torch.Tensor,
    test_tokens: torch.Tensor,
    test_y: torch.Tensor,
    *,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
    **fit_kwargs,
) -> AttentiveResult:
    """Train on (train_tokens [N, T, D], train_y [N]), report top-1 on (test_tokens [M, T, D], test_y [M])."""
    started = time.perf_counter()
    if len(train_tokens) != len(train_y) or len(test_tokens) != len(test_y) or not len(train_y):
        raise ValueError(
            f"need matching tokens and labels: train {tuple(train_tokens.shape)} / {tuple(train_y.shape)}, "
            f"test {tuple(test_tokens.shape)} / {tuple(test_y.shape)}"
        )
    device = torch.device(device) if device is not None else train_tokens.device
    K = num_classes or int(max(train_y.max(), test_y.max() if len(test_y) else 0)) + 1
    probe, steps = fit_attentive_probe(train_tokens.to(device), train_y, K, **fit_kwargs)
    defaults = {"num_heads": 8, "lr": DEFAULT_LR, "weight_decay": DEFAULT_WD, "batch_size": DEFAULT_BATCH_SIZE}
    settings = defaults | {k: v for k, v in fit_kwargs.items() if k in defaults}
    return AttentiveResult(
        top1=probe_top1(probe, test_tokens.to(device), test_y),
        train_top1=probe_top1(probe, train_tokens.to(device), train_y),
        num_classes=K,
        steps=steps,
        seconds=time.perf_counter() - started,
        **settings,
    )
