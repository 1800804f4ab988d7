"""Linear probe: multinomial logistic regression on whitened (or standardised) frozen features.

1. Preprocess with statistics of the train split only. ``whiten`` (default): subtract the mean and
   rotate-and-scale by the inverse square root of the covariance (PCA whitening, eigenvalues floored
   at ``WHITEN_EPS`` x the largest). It is a linear change of coordinates, so the probe's model class
   is that of standardised features; what it changes is the conditioning. Frozen features are
   strongly correlated (a ViT-tiny after 20 demo steps: covariance eigenvalues from 9 down to 1e-14)
   and a first-order fit on per-dimension standardised features stops far from the optimum: on
   those features, Fashion-MNIST test top-1 was 74.4% standardised vs 81.6% whitened with the same
   500 Adam steps (full-batch L-BFGS on standardised features, 500 iterations: 79.1%). The weight
   decay applies in the whitened coordinates. ``standardize``: (x - mean) / std per dimension.
2. Hold out ``val_fraction`` (10%) of the train split and fit every (learning rate, weight decay)
   pair of a small grid on the rest; keep the pair with the best held-out top-1.
3. Refit that pair on the whole train split and report test top-1.

The fit is mini-batch Adam (4096 rows; full batch below that) on ``mean cross-entropy + wd *
||W||^2 / 2`` (bias not decayed), ``default_steps`` steps with a cosine learning-rate decay, on the
features' device. All pairs of the grid are fitted at once as one wide linear layer [P*K, D] (P
pairs, K classes) over the same mini-batches: one matmul per step serves the whole sweep. Gradients
are written out (softmax minus one-hot) rather than taken by autograd, and accumulated over row
chunks so that no more than ``MAX_LOGIT_ELEMENTS`` logits are held at once (ImageNet: 1000 classes).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch

DEFAULT_LRS = (0.03, 0.1)
MIN_TRAIN_IMAGES = 2  # one held out to choose lr and weight decay, at least one to fit on
DEFAULT_WDS = (0.0, 1e-4, 1e-3, 1e-2)
# Mini-batch Adam, at least 500 steps and 30 epochs. On standardised random-projection features
# of Fashion-MNIST (60,000 x 192, well conditioned) 500 steps of 4096 (38 epochs) matched test top-1
# of a full-batch L-BFGS fit (83.41 vs 83.40; 83.26 at 300 steps).
DEFAULT_STEPS = 500
DEFAULT_BATCH_SIZE = 4096
MIN_EPOCHS = 30
# A fit whose step is below this many multiply-adds runs on one CPU thread: OpenMP's fork/join on
# each small op costs more than it saves, and milliseconds per op when the cores are shared. Measured
# on 2 cores shared with other work, 100 steps of (4096 x 192) x 80: 0.83 s on 1 thread, 5.2 s on 2.
SINGLE_THREAD_MACS = 1 << 28
# Logit elements held at once (rows x pairs x classes): 2^25 floats = 128 MiB; larger problems
# are processed in row chunks of this size.
MAX_LOGIT_ELEMENTS = 1 << 25
# Whitening floors covariance eigenvalues at this fraction of the largest (1e-8 .. 1e-4 gave the same
# top-1 within 0.1 point on the features above); rows per chunk when accumulating the covariance.
WHITEN_EPS = 1e-6
COV_CHUNK_ROWS = 1 << 16
PREPROCESS = ("whiten", "standardize")


@dataclass
class ProbeResult:
    top1: float  # test top-1 in [0, 1] of the refit probe
    best_lr: float
    best_wd: float
    val_top1: float  # held-out top-1 of the chosen pair
    train_top1: float  # train top-1 of the refit probe
    num_classes: int
    steps: int
    seconds: float
    preprocess: str = "whiten"
    sweep: list[dict] = field(default_factory=list)  # {"lr", "wd", "val_top1"} per pair

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def standardize(train_x: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6) -> list[torch.Tensor]:
    """(x - mean) / std with the train split's statistics, for ``train_x`` and each of ``others``."""
    mean = train_x.mean(0)
    std = train_x.std(0).clamp(min=eps)
    return [(x - mean) / std for x in (train_x, *others)]


@torch.no_grad()
def whiten(train_x: torch.Tensor, *others: torch.Tensor, eps: float = WHITEN_EPS) -> list[torch.Tensor]:
    """PCA whitening with the train split's mean and covariance, for ``train_x`` and each of ``others``:
    x -> (x - mean) @ U diag(1 / sqrt(lambda + eps * lambda_max)), float32 out, fp64 statistics."""
    N, D = train_x.shape
    mean = train_x.mean(0, dtype=torch.float64)
    cov = torch.zeros(D, D, dtype=torch.float64, device=train_x.device)
    for i in range(0, N, COV_CHUNK_ROWS):
        xc = train_x[i : i + COV_CHUNK_ROWS].double() - mean  # (n, D)
        cov.addmm_(xc.T, xc)
    lam, U = torch.linalg.eigh(cov / max(N, 1))  # ascending eigenvalues, (D,), (D, D)
    T = (U / (lam.clamp(min=0) + eps * lam.max().clamp(min=1e-30)).sqrt()).float()  # (D, D)
    mean32 = mean.float()
    return [(x - mean32) @ T for x in (train_x, *others)]


def default_steps(n: int, batch_size: int = DEFAULT_BATCH_SIZE) -> int:
    """``DEFAULT_STEPS``, or more when that would be fewer than ``MIN_EPOCHS`` passes over n rows."""
    return max(DEFAULT_STEPS, math.ceil(MIN_EPOCHS * n / max(1, min(batch_size, n))))


def fit_softmax_regression(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    lrs: torch.Tensor,
    wds: torch.Tensor,
    steps: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit P independent softmax regressions at once, pair p with (lrs[p], wds[p]).

    x [N, D] float, y [N] int64 -> weights [P, D, K], biases [P, K]. Mini-batches of ``batch_size``
    rows (full batch when N is smaller), reshuffled each epoch from ``seed``; ``steps`` Adam steps
    (default: ``default_steps``) with the learning rate decaying to 0 along a cosine.
    """
    N, D = x.shape
    P, K = len(lrs), num_classes
    B = min(batch_size, N)
    steps = steps or default_steps(N, B)
    dev, dt = x.device, x.dtype
    # Classes-major layout: logits are [P*K, n] and the softmax runs over dim 1 of [P, K, n], with
    # the n samples contiguous: faster on the CPU than a softmax over a last dim of size K
    # (``python -m profiling.bench_choices``).
    W = torch.zeros(P * K, D, device=dev, dtype=dt)  # row p*K + k: pair p, class k
    b = torch.zeros(P * K, 1, device=dev, dtype=dt)
    lr_row = lrs.to(dev, dt).repeat_interleave(K)[:, None]  # (P*K, 1)
    wd_row = wds.to(dev, dt).repeat_interleave(K)[:, None]
    mW, vW, mb, vb = torch.zeros_like(W), torch.zeros_like(W), torch.zeros_like(b), torch.zeros_like(b)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    chunk = max(1, MAX_LOGIT_ELEMENTS // (P * K))
    onehot = torch.nn.functional.one_hot(y, K).to(dt)  # (N, K)
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.arange(N, device=dev), 0
    gW, gb = torch.empty_like(W), torch.empty_like(b)
    with cpu_threads(dev, 2 * B * P * K * D):
        for t in range(1, steps + 1):
            if B == N:
                xb, ob = x, onehot
            else:
                if pos + B > N:
                    order, pos = torch.randperm(N, generator=gen).to(dev), 0
                idx = order[pos : pos + B]
                pos += B
                xb, ob = x[idx], onehot[idx]
            gW.zero_()
            gb.zero_()
            for i in range(0, B, chunk):
                xc, oc = xb[i : i + chunk], ob[i : i + chunk]  # (n, D), (n, K)
                z = torch.addmm(b, W, xc.T).view(P, K, -1)  # (P, K, n)
                g = torch.softmax(z, dim=1).sub_(oc.T[None]).view(P * K, -1)  # dCE/dz
                gW.addmm_(g, xc)  # (P*K, D)
                gb.add_(g.sum(1, keepdim=True))
            gW.div_(B).addcmul_(W, wd_row)
            gb.div_(B)
            lr_t = lr_row * (0.5 * (1 + math.cos(math.pi * (t - 1) / steps)))  # cosine decay to 0
            for p, g, m, v in ((W, gW, mW, vW), (b, gb, mb, vb)):
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
                p.sub_(lr_t * (m / (1 - beta1**t)) / denom)
    return W.view(P, K, D).transpose(1, 2).contiguous(), b.view(P, K)


@contextlib.contextmanager
def cpu_threads(device: torch.device, macs_per_step: int):
    """One intra-op thread for small CPU fits (see ``SINGLE_THREAD_MACS``), restored afterwards."""
    before = torch.get_num_threads()
    if device.type == "cpu" and macs_per_step < SINGLE_THREAD_MACS and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@torch.no_grad()
def top1(x: torch.Tensor, y: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Top-1 of each of P probes: x [N, D], W [P, D, K], b [P, K] -> [P], chunked over rows."""
    P, D, K = W.shape
    W2 = W.permute(1, 0, 2).reshape(D, P * K)
    rows = max(1, MAX_LOGIT_ELEMENTS // (P * K))
    correct = torch.zeros(P, device=x.device)
    for i in range(0, len(x), rows):
        pred = torch.addmm(b.reshape(-1), x[i : i + rows], W2).view(-1, P, K).argmax(-1)  # (n, P)
        correct += (pred == y[i : i + rows, None]).sum(0)
    return correct / max(len(x), 1)


@torch.no_grad()
def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    lrs: tuple[float, ...] = DEFAULT_LRS,
    wds: tuple[float, ...] = DEFAULT_WDS,
    steps: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str | torch.device | None = None,
    num_classes: int | None = None,
    preprocess: str = "whiten",
) -> ProbeResult:
    """Sweep (lr, wd) on a held-out part of train, refit the best on all of train, test it.

    train_x [N, D], train_y [N] int, test_x [M, D], test_y [M] int. Runs on ``device`` (default:
    train_x's device) in float32.
    """
    started = time.perf_counter()
    device = torch.device(device) if device is not None else train_x.device
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(
            f"need matching features and labels: train {tuple(train_x.shape)} / {tuple(train_y.shape)}, "
            f"test {tuple(test_x.shape)} / {tuple(test_y.shape)}"
        )
    if len(train_x) < MIN_TRAIN_IMAGES:
        raise ValueError(
            f"the linear probe needs at least {MIN_TRAIN_IMAGES} training images (one is held out to choose "
            f"the learning rate and weight decay); got {len(train_x)}"
        )
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must lie in (0, 1)")
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess={preprocess!r}: choose one of {PREPROCESS}")
    prep = whiten if preprocess == "whiten" else standardize
    xs, xt = prep(train_x.to(device, torch.float32), test_x.to(device, torch.float32))
    ys, yt = train_y.to(device, torch.int64), test_y.to(device, torch.int64)
    K = num_classes or int(max(ys.max().item(), yt.max().item() if len(yt) else 0)) + 1

    perm = torch.randperm(len(xs), generator=torch.Generator().manual_seed(seed)).to(device)
    n_val = min(max(1, round(val_fraction * len(xs))), len(xs) - 1)
    val, fit = perm[:n_val], perm[n_val:]
    grid = [(lr, wd) for lr in lrs for wd in wds]
    lr_t = torch.tensor([g[0] for g in grid], dtype=torch.float32)
    wd_t = torch.tensor([g[1] for g in grid], dtype=torch.float32)
    steps = steps or default_steps(len(fit), batch_size)
    W, b = fit_softmax_regression(xs[fit], ys[fit], K, lr_t, wd_t, steps, batch_size, seed)
    val_acc = top1(xs[val], ys[val], W, b).tolist()
    # best held-out top-1; ties go to the stronger weight decay, then the smaller learning rate
    best = max(range(len(grid)), key=lambda i: (val_acc[i], grid[i][1], -grid[i][0]))
    lr, wd = grid[best]

    W, b = fit_softmax_regression(xs, ys, K, lr_t[best : best + 1], wd_t[best : best + 1], steps, batch_size, seed)
    return ProbeResult(
        top1=top1(xt, yt, W, b).item() if len(xt) else float("nan"),
        best_lr=lr,
        best_wd=wd,
        val_top1=val_acc[best],
        train_top1=top1(xs, ys, W, b).item(),
        num_classes=K,
        steps=steps,
        seconds=time.perf_counter() - started,
        preprocess=preprocess,
        sweep=[{"lr": g[0], "wd": g[1], "val_top1": a} for g, a in zip(grid, val_acc)],
    )
