"""Multi-block mask sampler (I-JEPA), vectorised over the batch and deterministic in (seed, step).

Semantics (the paper, Assran et al. 2023, and the authors' code): per batch, one target block size
(scale ~ U(pred_scale), aspect ratio ~ U(aspect_ratio)) and one context block size (scale ~
U(enc_scale), aspect 1); per image, M target block positions and one context block position. The
context is its block minus the union of the targets. Every image then keeps the same number of
context patches and of target patches per block (the batch minimum), so the outputs are dense
tensors.

Departures from the authors' sampler, each fixing a known defect. Coverage below = how often each
patch is kept, max/min over the grid; 16x16 grid, default scales, 64 batches of 128, measured by
``python -m profiling.bench_masks`` against the re-statement ``profiling/authors_masks.py``:

- (a) Positions. The authors draw the top-left corner from [0, H - h), so the last row and column
  are never covered, by targets or by the context (31 of 256 patches never used). We draw the
  block's *centre* uniformly over the grid and shift the block inside it,
  top = clamp(c - h // 2, 0, H - h): every position 0..H-h is reachable and blocks stay full size
  (shifted, not clipped).
- (a') Size cap. The authors shrink every block side to at most H - 1 (``while h >= self.height:
  h -= 1``), which their corner draw needs (``randint(0, H - h)`` is empty at h = H). Centre-drawn
  positions need no cap, so here a block side may reach H (``block_size`` clamps to the grid): a
  context block can cover the whole grid, as enc_scale up to 1.0 asks. We keep it so rather than
  copy the cap, which would hold the context below enc_scale[0] on small grids: with the default
  enc_scale (0.85, 1.0) the context is the whole 4x4 grid of the demo here, 3x3 = 56% of it under
  the cap; on 16x16 the cap takes blocks of scale above about 0.94 down to 15x15 (88%).
- (b) Centre under-represented in contexts. Uniform corners cover a centre patch about h times as
  often as an edge patch per axis, and overlap removal then strips the centre from contexts.
  Centre-drawn blocks: target coverage max/min 6.8 (authors: 46 over the patches they reach,
  infinite over the grid), context coverage max/min 3.2 (authors: 145 over the patches they reach);
  a context keeps a patch of the centre 4x4 0.73x as often as a border patch (authors: 0.22x).
  Not perfectly flat: the shift piles blocks on the edge positions (P(top = 0) = (h//2 + 1) / H),
  so target coverage peaks h - 1 patches in from each edge. Equalising counts, the authors keep
  the first k indices in raster order (biased to the top-left); we keep a uniformly random
  k-subset per image (random keys + top-k), returned sorted.
- (c) Retries. The authors loop per image until the context keeps more than ``min_keep`` patches,
  dropping constraints after timeouts (slow, and long spins on small grids). Here ``min_keep`` is the
  fewest a context keeps (at least ``min_keep``, as the paper words it): their ``min_keep`` is ours
  minus one, and ``config.authors`` adds the one when it reads their files. We redraw the context position
  only for the images that fall short, for a fixed number of vectorised rounds, then a
  deterministic fallback hands those contexts the ``min_keep`` patches of their block nearest its
  centre (uncovered patches first), taking them out of the targets; a target left empty gets the
  free patch nearest its centre. This terminates on every grid from 2x2 up; impossible settings
  are refused at construction.
- Scale and aspect ratio are drawn from independent random numbers: the authors reuse one number
  for both, which ties large blocks to tall ones.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ijepa_fast.runtime.rng import mix

# Vectorised context redraw rounds before the fallback. With the paper's scales no image needs even
# one on 16x16 or 14x14 grids (0 of 38,400); on 8x8, 70 of 38,400 fall short and 18 are left after
# 8 rounds for the fallback, which finishes the job, so more rounds would only add draws.
_CONTEXT_ROUNDS = 8

_KEY_BITS = 30  # random bits of an equalisation key (non-negative int32; -1 marks entries never kept)


@dataclass(frozen=True)
class MaskBatch:
    context: torch.Tensor  # [B, Kc] int64, sorted ascending per row, indices into the H*W grid
    targets: torch.Tensor  # [M, B, Kt] int64, sorted ascending per row

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskBatch:
        return MaskBatch(
            self.context.to(device, non_blocking=non_blocking), self.targets.to(device, non_blocking=non_blocking)
        )


class _Blocks(NamedTuple):
    """One batch's blocks before equalisation (``MultiBlockMaskSampler._blocks``)."""

    pred_hw: tuple[int, int]  # target block (h, w), shared by the batch
    enc_hw: tuple[int, int]  # context block (h, w), shared by the batch
    target_top: torch.Tensor  # [M, B] int64
    target_left: torch.Tensor  # [M, B] int64
    context_top: torch.Tensor  # [B] int64 (after redraws)
    context_left: torch.Tensor  # [B] int64
    context: torch.Tensor  # [B, H, W] bool: the context block minus the targets (or the fallback)
    targets: torch.Tensor | None  # [M, B, H, W] bool where the fallback edited them; None: the rectangles
    fell_back: torch.Tensor  # [B] bool: images whose context came from the fallback


def _check_pair(name: str, pair, lo_open: float, hi: float | None) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in pair)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={pair!r} must be a pair of numbers (lo, hi)") from None
    if not (a > lo_open and a <= b and (hi is None or b <= hi)):
        bound = f"{lo_open} < lo <= hi" + (f" <= {hi}" if hi is not None else "")
        raise ValueError(f"{name}={pair!r} is invalid: need {bound}")
    return a, b


def block_size(scale: float, ratio: float, height: int, width: int) -> tuple[int, int]:
    """(h, w) of a block covering ``scale`` of the grid at aspect ratio h/w ``ratio``, clamped to it.
    The area is rounded down to whole patches first, as the authors' ``max_keep`` (the same product,
    in the same order), then each side is rounded to the nearest integer."""
    area = int(height * width * scale)
    h = min(max(round(math.sqrt(area * ratio)), 1), height)
    w = min(max(round(math.sqrt(area / ratio)), 1), width)
    return h, w


class MultiBlockMaskSampler:
    """``sampler(batch_size, step, device=None) -> MaskBatch``, pure in (seed, step, batch_size).

    ``context`` [B, Kc] and ``targets`` [M, B, Kt] are int64 indices into the row-major H*W patch
    grid, sorted ascending per row; Kc >= ``min_keep`` and Kt >= 1. Sampling runs on the CPU
    (in the DataLoader's collate) and the result is moved to ``device`` if one is given.
    """

    def __init__(
        self,
        grid: int | tuple[int, int],
        *,
        num_pred_masks: int = 4,
        pred_scale=(0.15, 0.2),
        enc_scale=(0.85, 1.0),
        aspect_ratio=(0.75, 1.5),
        min_keep: int = 10,
        allow_overlap: bool = False,
        seed: int = 0,
    ):
        try:
            self.height, self.width = (int(grid), int(grid)) if isinstance(grid, numbers.Integral) else map(int, grid)
        except (TypeError, ValueError):
            raise ValueError(f"grid={grid!r} must be an int or a pair of ints (height, width) in patches") from None
        if self.height < 2 or self.width < 2:
            raise ValueError(f"grid={grid!r} is too small: the mask sampler needs at least 2x2 patches")
        if num_pred_masks < 1:
            raise ValueError(f"num_pred_masks={num_pred_masks} must be >= 1")
        self.num_pred_masks = int(num_pred_masks)
        self.pred_scale = _check_pair("pred_scale", pred_scale, 0.0, 1.0)
        self.enc_scale = _check_pair("enc_scale", enc_scale, 0.0, 1.0)
        self.aspect_ratio = _check_pair("aspect_ratio", aspect_ratio, 0.0, None)
        most = self.max_min_keep()
        if not 1 <= min_keep <= most:
            raise ValueError(
                f"min_keep={min_keep} cannot be kept on a {self.height}x{self.width} grid with "
                f"enc_scale={self.enc_scale}: it must lie in [1, {most}] (the smallest context block "
                f"holds {self._smallest_context()} patches and one patch must stay for the targets)"
            )
        self.min_keep = int(min_keep)
        self.allow_overlap = bool(allow_overlap)
        self.seed = int(seed)

    def _smallest_context(self) -> int:
        # the block area grows with the scale, so the smallest block is the one at enc_scale[0]
        h, w = block_size(self.enc_scale[0], 1.0, self.height, self.width)
        return h * w

    def max_min_keep(self) -> int:
        """The largest ``min_keep`` this grid and ``enc_scale`` can always honour: every context stays
        inside its block and leaves at least one patch of the grid to the targets."""
        return min(self._smallest_context(), self.height * self.width - 1)

    # ------------------------------------------------------------------ state
    def _params(self) -> dict:
        return {
            "grid": [self.height, self.width],
            "num_pred_masks": self.num_pred_masks,
            "pred_scale": list(self.pred_scale),
            "enc_scale": list(self.enc_scale),
            "aspect_ratio": list(self.aspect_ratio),
            "min_keep": self.min_keep,
            "allow_overlap": self.allow_overlap,
        }

    def state_dict(self) -> dict:
        return {"seed": self.seed, **self._params()}

    def load_state_dict(self, state: dict) -> None:
        ours = self._params()
        diff = {k: (state.get(k), v) for k, v in ours.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"mask sampler state disagrees with this sampler: {diff} (saved, current)")
        self.seed = int(state["seed"])

    # ------------------------------------------------------------------ sampling
    def __call__(self, batch_size: int, step: int, device: torch.device | str | None = None) -> MaskBatch:
        blocks, g = self._blocks(batch_size, step)
        M, B = self.num_pred_masks, batch_size
        ph, pw = blocks.pred_hw
        if blocks.targets is None:  # full rectangles of ph*pw patches: their indices directly, sorted
            targets = _rect_indices(blocks.target_top, blocks.target_left, ph, pw, self.width)  # (M, B, ph*pw)
        else:  # the fallback edited some: equalise over all M*B rows
            targets = _random_subset(blocks.targets.view(M * B, -1), g).view(M, B, -1)  # (M, B, Kt)
        if self.allow_overlap:  # every context is its full block
            eh, ew = blocks.enc_hw
            context = _rect_indices(blocks.context_top, blocks.context_left, eh, ew, self.width)  # (B, eh*ew)
        else:
            context = _random_subset(blocks.context.view(B, -1), g)  # (B, Kc)
        batch = MaskBatch(context, targets)
        return batch if device is None else batch.to(device)

    def _blocks(self, batch_size: int, step: int) -> tuple[_Blocks, torch.Generator]:
        """The batch's blocks before equalisation, and the generator to go on drawing from."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        H, W, M, B = self.height, self.width, self.num_pred_masks, batch_size
        g = torch.Generator().manual_seed(mix(self.seed, step))
        # Three independent numbers: target scale, target aspect ratio, context scale. (The authors
        # draw one number per block and use it for both scale and ratio; we do not copy that.)
        u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
        ph, pw = block_size(_lerp(self.pred_scale, u[0]), _lerp(self.aspect_ratio, u[1]), H, W)
        eh, ew = block_size(_lerp(self.enc_scale, u[2]), 1.0, H, W)
        centre = torch.randint(0, H * W, (M + 1, B), generator=g)  # one flat centre per block
        t_top, t_left = self._corner(centre[:M], ph, pw)  # (M, B)
        c_top, c_left = self._corner(centre[M], eh, ew)  # (B,)
        t_rows, t_cols = _tables(H, W, ph, pw)
        rects = t_rows[t_top.view(-1)] & t_cols[t_left.view(-1)]  # (M*B, H*W)
        covered = rects[:B].clone()  # (B, H*W): the union of the M targets; an OR chain over
        for m in range(1, M):  # contiguous slices beats .any(0) on [M, B, H*W] (see bench_choices)
            covered |= rects[m * B : (m + 1) * B]
        e_rows, e_cols = _tables(H, W, eh, ew)
        block = e_rows[c_top] & e_cols[c_left]  # (B, H*W): the context blocks
        fell_back = torch.zeros(B, dtype=torch.bool)
        targets = None
        if self.allow_overlap:  # the context is its block, >= min_keep patches by construction
            context = block
        else:
            context = block & ~covered
            short = context.sum(1, dtype=torch.int32) < self.min_keep  # (B,)
            rounds = _CONTEXT_ROUNDS if eh < H or ew < W else 0  # a full-grid block has nowhere else to go
            for _ in range(rounds):  # redraw the position only where the context is too small
                if not short.any():  # sampling runs on the CPU: this is no device sync
                    break
                n_top, n_left = self._corner(torch.randint(0, H * W, (B,), generator=g), eh, ew)
                c_top, c_left = torch.where(short, n_top, c_top), torch.where(short, n_left, c_left)
                block = torch.where(short[:, None], e_rows[c_top] & e_cols[c_left], block)
                context = torch.where(short[:, None], block & ~covered, context)
                short = context.sum(1, dtype=torch.int32) < self.min_keep
            fell_back = short
            if fell_back.any():
                nearest = self._fallback_context(block, c_top, c_left, eh, ew, covered)
                context = torch.where(fell_back[:, None], nearest, context)
                targets = _repair_empty(rects.view(M, B, -1) & ~context, t_top, t_left, ph, pw, context, H, W)
                targets = targets.view(M, B, H, W)
        return _Blocks((ph, pw), (eh, ew), t_top, t_left, c_top, c_left, context.view(B, H, W), targets, fell_back), g

    def _corner(self, centre: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-left corners of h x w blocks centred on the flat indices ``centre``, shifted inside."""
        cy, cx = centre.div(self.width, rounding_mode="floor"), centre.remainder(self.width)
        return (cy - h // 2).clamp_(0, self.height - h), (cx - w // 2).clamp_(0, self.width - w)

    def _fallback_context(
        self, block: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: int, w: int, covered: torch.Tensor
    ) -> torch.Tensor:
        """[B, H*W] bool: the ``min_keep`` patches of each context block (block [B, H*W]) nearest its
        centre, uncovered ones first (all of them: there are fewer than min_keep), then covered ones."""
        B, N = block.shape
        H, W = self.height, self.width
        d2 = _centre_dist2(top, left, h, w, H, W).view(B, N)  # integer, so ties are exact
        rank = (~block).long() * 2 + covered.long()  # 0 free, 1 covered by a target, 2 outside the block
        key = (rank * (4 * (H * H + W * W) + 1) + d2) * N + torch.arange(N)  # unique: deterministic top-k
        nearest = key.topk(self.min_keep, dim=1, largest=False, sorted=False).indices
        return torch.zeros_like(block).scatter_(1, nearest, True)


@functools.lru_cache(maxsize=256)
def _tables(H: int, W: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat masks [H - h + 1, H*W] of rows top..top+h-1 and [W - w + 1, H*W] of columns
    left..left+w-1, so a block is ``rows[top] & cols[left]`` (read-only, cached per block size).
    Gathering table rows and one AND over contiguous [B, H*W] beats broadcasting [B, H, 1] &
    [B, 1, W], whose inner loops have only W elements (``python -m profiling.bench_choices``)."""
    dr = torch.arange(H).repeat_interleave(W) - torch.arange(H - h + 1)[:, None]  # (H-h+1, H*W)
    dc = torch.arange(W).repeat(H) - torch.arange(W - w + 1)[:, None]  # (W-w+1, H*W)
    return (dr >= 0) & (dr < h), (dc >= 0) & (dc < w)


def _lerp(pair: tuple[float, float], u: float) -> float:
    return pair[0] + u * (pair[1] - pair[0])


def _centre_dist2(top: torch.Tensor, left: torch.Tensor, h: int, w: int, H: int, W: int) -> torch.Tensor:
    """[..., H, W] int64: (2 * distance)^2 of every patch to the centre of the block at (top, left)."""
    dy = 2 * torch.arange(H) - (2 * top[..., None] + h - 1)  # (..., H)
    dx = 2 * torch.arange(W) - (2 * left[..., None] + w - 1)  # (..., W)
    return dy[..., :, None] ** 2 + dx[..., None, :] ** 2


def _repair_empty(
    targets: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: int, w: int, context: torch.Tensor, H: int, W: int
) -> torch.Tensor:
    """Give each target block that the fallback context emptied the free patch nearest its centre.

    targets [M, B, H*W], context [B, H*W] (bool), top/left [M, B]. The context holds at most
    H*W - 1 patches (min_keep is bounded at construction), so a free patch always exists.
    """
    empty = ~targets.any(2)  # (M, B)
    if not empty.any():
        return targets
    M, B, N = targets.shape
    d2 = _centre_dist2(top, left, h, w, H, W).view(M, B, N)
    key = (context.long() * (4 * (H * H + W * W) + 1) + d2) * N + torch.arange(N)  # unique: exact argmin
    nearest = torch.zeros_like(targets).scatter_(2, key.argmin(2, keepdim=True), True)
    return torch.where(empty[..., None], nearest, targets)


def _rect_indices(top: torch.Tensor, left: torch.Tensor, h: int, w: int, width: int) -> torch.Tensor:
    """[..., h*w] int64 row-major (so sorted) grid indices of the h x w blocks at (top, left)."""
    rows = (top[..., None] + torch.arange(h)) * width  # (..., h)
    cols = left[..., None] + torch.arange(w)  # (..., w)
    return (rows[..., :, None] + cols[..., None, :]).flatten(-2)


def _random_subset(mask: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """[R, N] bool -> [R, k] int64 sorted indices of a uniformly random k-subset of each row's True
    entries (rows independent), k the smallest row count (at least 1)."""
    R, N = mask.shape
    counts = mask.sum(1, dtype=torch.int32)
    k = max(int(counts.min()), 1)
    if int(counts.max()) == k:  # nothing to drop
        return mask.nonzero()[:, 1].view(R, k)
    # 30 random bits per entry where it may be kept, -1 elsewhere: the top-k keys are a uniform
    # k-subset of the keepable entries. Two int32 keys per int64 draw halve the generator calls, and
    # top-k runs faster on int32 keys than on float32 ones (``python -m profiling.bench_choices``).
    bits = torch.empty((R * N + 1) // 2, dtype=torch.int64).random_(generator=g)
    keys = bits.view(torch.int32)[: R * N].view(R, N).bitwise_and_((1 << _KEY_BITS) - 1)
    keys = torch.where(mask, keys, -1)  # (R, N): entries that may not be kept rank last
    chosen = keys.topk(k, dim=1, sorted=False).indices  # (R, k), in no particular order
    return in_index_order(chosen, N)


def in_index_order(chosen: torch.Tensor, n: int, count_dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """[R, k] distinct indices below ``n`` per row -> the same indices sorted within each row, by
    counting: a winner's rank is the number of winners at or before it. Branch-free, so faster than
    sorting them or scatter + nonzero, which mispredict a branch per element on fresh data
    (``python -m profiling.bench_choices``); int32 counts halve the [R, n] buffer."""
    kept = torch.zeros(chosen.shape[0], n, dtype=count_dtype).scatter_(1, chosen, 1)
    rank = kept.cumsum_(1).gather(1, chosen).sub_(1).long()  # (R, k)
    return torch.empty_like(chosen).scatter_(1, rank, chosen)


def check_masks(batch: MaskBatch, grid: int | tuple[int, int]) -> None:
    """Raise ValueError unless ``batch`` holds int64 [B, Kc] / [M, B, Kt] indices inside the grid."""
    h, w = (grid, grid) if isinstance(grid, int) else grid
    ctx, tgt = batch.context, batch.targets
    if ctx.dtype != torch.int64 or tgt.dtype != torch.int64:
        raise ValueError(f"mask indices must be int64, got context {ctx.dtype} and targets {tgt.dtype}")
    if ctx.dim() != 2 or tgt.dim() != 3 or tgt.shape[1] != ctx.shape[0]:
        raise ValueError(
            f"masks must be context [B, Kc] and targets [M, B, Kt], got {tuple(ctx.shape)} and {tuple(tgt.shape)}"
        )
    for name, t in (("context", ctx), ("targets", tgt)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= h * w):
            raise ValueError(
                f"{name} indices lie outside the {h}x{w} grid "
                f"(range [{int(t.min())}, {int(t.max())}], need [0, {h * w - 1}])"
            )
