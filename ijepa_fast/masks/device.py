"""The multi-block mask sampler as device code: same semantics as ``ijepa_fast.masks.sampler``, computed
where the batch lives (CUDA for the DALI loader), with one read-back per batch started a step early.

``masks.MultiBlockMaskSampler`` runs on the CPU by design (inside the DataLoader's collate): it
draws from a CPU ``torch.Generator``, branches on ``.any()`` and reads counts back with ``int()``;
its ``device`` argument only copies the result. Here every step is branch-free tensor code on
``device``:

- Randomness is a counter-based hash of (seed, step, stream, element) in exact int64 arithmetic, so
  the masks of a step are bit-identical on every device (what CI checks on the CPU is what runs on
  the GPU). The draws differ from the CPU sampler's, the distribution does not: one target block
  size (scale, aspect ratio: independent numbers) and one context block size per batch, block
  centres uniform over the grid with the block shifted inside, the context minus the targets.
- The context redraw rounds are drawn at once and the first candidate that keeps ``min_keep``
  patches is taken (the CPU sampler's sequential rule); the fallback context (the ``min_keep``
  patches nearest the block centre, uncovered first) and the repair of emptied targets are computed
  for every image and selected with ``torch.where``.
- Output widths (the batch minima of context / target counts) decide tensor shapes, so they must
  reach the host, and the host must not wait for them behind the training step. Each call
  therefore samples the blocks of the *next* step as well and starts copying its three widths to
  the host; the next call reads them from host memory. On CUDA that work runs on a high-priority
  side stream (its kernels go ahead of the step's GEMMs) and the copy lands in pinned memory with
  an event behind it, so the host waits, if at all, for an event recorded a whole step earlier,
  never for the current stream. The current stream waits for the side stream's masks through an
  event (no host sync). A call for any other step (the first, a restart, another batch size)
  samples its own blocks first and waits for their widths only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ijepa_fast.masks.sampler import MaskBatch, MultiBlockMaskSampler, block_size
from ijepa_fast.runtime.rng import mix

# Context redraw rounds before the fallback, as the CPU sampler. Drawn all at once here: with the
# paper's scales on a 16x16 grid the first draw almost always keeps min_keep patches.
_CONTEXT_ROUNDS = 8
_M32 = 0xFFFFFFFF
# stream ids of the hash RNG (any distinct constants)
_SIZES, _TARGET_POS, _CONTEXT_POS, _CONTEXT_KEEP, _TARGET_KEEP = 0, 1, 2, 3, 4


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32) without int64 overflow (16-bit halves of c)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _permute32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2**32) with strong avalanche (Wellons' lowbias32), on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_uint32(key: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int64 tensor of ``shape`` with independent uniform values in [0, 2**32), a pure function of
    (key, element index): the same on every device."""
    n = 1
    for s in shape:
        n *= s
    c = torch.arange(n, device=device, dtype=torch.int64)
    h = _permute32(_permute32(c ^ (key & _M32)) ^ ((key >> 32) & _M32))
    return h.view(shape)


def _randint(key: int, shape: tuple[int, ...], n: int, device: torch.device) -> torch.Tensor:
    """Uniform integers in [0, n) (Lemire's multiply-shift; n < 2**31, so no overflow)."""
    return (hash_uint32(key, shape, device) * n) >> 32


def _uniform(key: int, i: int) -> float:
    """A host-side uniform float in [0, 1) from (key, i): 53 bits of splitmix64."""
    return (mix(key, i) >> 10) / float(1 << 53)


class DeviceMaskSampler(MultiBlockMaskSampler):
    """``sampler(batch_size, step, device=None) -> MaskBatch`` computed on ``device``.

    Same constructor, validation and state dict as ``MultiBlockMaskSampler``; pure in
    (seed, step, batch_size) and identical across devices. Outputs: context [B, Kc] and
    targets [M, B, Kt], int64, sorted ascending per row, on ``device`` (CPU when None).
    """

    def __init__(self, grid, **kwargs):
        super().__init__(grid, **kwargs)
        if self.height * self.width > 1 << 16:  # equalisation keys pack the patch index in 16 bits
            raise ValueError(f"grid {self.height}x{self.width} has more than 65536 patches")
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._ahead: _Ahead | None = None  # the next step's blocks, sampled by the last call

    def _key(self, step: int, stream: int) -> int:
        return mix(mix(self.seed, step), stream)

    def block_sizes(self, step: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((h, w) of the target blocks, (h, w) of the context block) of ``step``: host-side."""
        key = self._key(step, _SIZES)
        s, r, e = (_uniform(key, i) for i in range(3))  # independent target scale, ratio, context scale
        lerp = lambda pair, u: pair[0] + u * (pair[1] - pair[0])  # noqa: E731
        pred = block_size(lerp(self.pred_scale, s), lerp(self.aspect_ratio, r), self.height, self.width)
        return pred, block_size(lerp(self.enc_scale, e), 1.0, self.height, self.width)

    def _corner(self, centre: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-left corners of h x w blocks centred on flat indices ``centre``, shifted inside the grid."""
        cy, cx = centre.div(self.width, rounding_mode="floor"), centre.remainder(self.width)
        return (cy - h // 2).clamp(0, self.height - h), (cx - w // 2).clamp(0, self.width - w)

    def _rect(self, top: torch.Tensor, left: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Boolean [..., H, W] rectangles with corners (top, left) and size h x w."""
        dr = torch.arange(self.height, device=top.device) - top[..., None]  # (..., H)
        dc = torch.arange(self.width, device=top.device) - left[..., None]  # (..., W)
        return ((dr >= 0) & (dr < h))[..., :, None] & ((dc >= 0) & (dc < w))[..., None, :]

    def _dist2(self, top: torch.Tensor, left: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[..., H, W] int64: (2 * distance)^2 of every patch to the centre of the block at (top, left):
        integers, so the same on every device."""
        dy = 2 * torch.arange(self.height, device=top.device) - (2 * top[..., None] + h - 1)  # (..., H)
        dx = 2 * torch.arange(self.width, device=top.device) - (2 * left[..., None] + w - 1)  # (..., W)
        return dy[..., :, None] ** 2 + dx[..., None, :] ** 2

    def sample_blocks(self, batch_size: int, step: int, device: torch.device | str | None = None) -> dict:
        """Blocks before equalisation: ``targets`` [M, B, H, W] and ``context`` [B, H, W] (bool; the
        targets already minus a fallback context), ``pred_size`` / ``enc_size`` (h, w), and
        ``fell_back`` [B] (bool tensor: the image's context came from the fallback)."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        device = torch.device("cpu" if device is None else device)
        H, W, M, B, R = self.height, self.width, self.num_pred_masks, batch_size, _CONTEXT_ROUNDS + 1
        (ph, pw), (eh, ew) = self.block_sizes(step)
        t_top, t_left = self._corner(_randint(self._key(step, _TARGET_POS), (M, B), H * W, device), ph, pw)
        targets = self._rect(t_top, t_left, ph, pw)  # (M, B, H, W)
        covered = targets.any(0)  # (B, H, W)
        # every candidate context block at once: the first draw and the redraws
        c_top, c_left = self._corner(_randint(self._key(step, _CONTEXT_POS), (R, B), H * W, device), eh, ew)  # (R, B)
        blocks = self._rect(c_top, c_left, eh, ew)  # (R, B, H, W)
        fresh = blocks if self.allow_overlap else blocks & ~covered
        ok = fresh.flatten(2).sum(2) >= self.min_keep  # (R, B)
        # the first acceptable round, else the last one (whose block the fallback then uses)
        pick = torch.where(ok, torch.arange(R, device=device)[:, None], R - 1).min(0, keepdim=True).values  # (1, B)
        context = fresh.gather(0, pick[..., None, None].expand(1, B, H, W))[0]  # (B, H, W)
        top, left = c_top.gather(0, pick)[0], c_left.gather(0, pick)[0]  # (B,)
        fell_back = ~ok.any(0)  # (B,)
        context = torch.where(fell_back[:, None, None], self._fallback_context(top, left, eh, ew, covered), context)
        if not self.allow_overlap:  # a no-op except where a fallback context took target patches
            targets = self._repair_empty(targets & ~context, t_top, t_left, ph, pw, context)
        return {
            "targets": targets,
            "context": context,
            "pred_size": (ph, pw),
            "enc_size": (eh, ew),
            "fell_back": fell_back,
        }

    def _fallback_context(
        self, top: torch.Tensor, left: torch.Tensor, h: int, w: int, covered: torch.Tensor
    ) -> torch.Tensor:
        """[B, H, W] bool: the ``min_keep`` patches of each context block nearest its centre,
        uncovered patches first, then covered ones (then, only if the block is too small, outside)."""
        B, H, W = covered.shape
        outside = ~self._rect(top, left, h, w)  # (B, H, W)
        big = 4 * (H * H + W * W) + 1  # above any (2 * distance)^2
        key = (outside.long() * 2 + covered.long()) * big + self._dist2(top, left, h, w)
        key = key.view(B, -1) * (H * W) + torch.arange(H * W, device=covered.device)  # unique: deterministic
        nearest = key.topk(self.min_keep, dim=1, largest=False, sorted=False).indices
        return torch.zeros(B, H * W, dtype=torch.bool, device=covered.device).scatter_(1, nearest, True).view(B, H, W)

    def _repair_empty(
        self, targets: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: int, w: int, context: torch.Tensor
    ) -> torch.Tensor:
        """Give each target block the fallback context emptied the free patch nearest its centre.
        targets [M, B, H, W], context [B, H, W] (bool); computed for all, applied where empty."""
        M, B, H, W = targets.shape
        empty = ~targets.flatten(2).any(2)  # (M, B)
        key = self._dist2(top, left, h, w) + context.long() * (4 * (H * H + W * W) + 1)  # (M, B, H, W)
        key = key.view(M, B, -1) * (H * W) + torch.arange(H * W, device=targets.device)
        nearest = torch.zeros(M, B, H * W, dtype=torch.bool, device=targets.device)
        nearest.scatter_(2, key.argmin(2, keepdim=True), True)
        return torch.where(empty[..., None, None], nearest.view(M, B, H, W), targets)

    def _start(self, batch_size: int, step: int, device: torch.device) -> _Ahead:
        """Sample the blocks of ``step`` and start copying its output widths to the host."""
        blocks = self.sample_blocks(batch_size, step, device)
        targets, context = blocks["targets"], blocks["context"]
        M, B = targets.shape[:2]
        ctx = context.flatten(1)  # (B, H*W)
        tgt = targets.flatten(2).reshape(M * B, -1)  # (M*B, H*W)
        # The batch minima decide the output widths, and the maximum whether target rows need a
        # random subset at all (each holds ph*pw patches unless repaired).
        ctx_n, tgt_n = ctx.sum(1), tgt.sum(1)
        widths = torch.stack([ctx_n.min(), tgt_n.min(), tgt_n.max()]).clamp(min=1)  # (3,)
        ready = None
        if device.type == "cuda":
            host = torch.empty(3, dtype=widths.dtype, pin_memory=True)
            widths = host.copy_(widths, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        return _Ahead((self.seed, batch_size, step, device), ctx, tgt, widths, ready)

    def _finish(self, ahead: _Ahead) -> MaskBatch:
        """The masks of a started step: read its widths (on the host by now), then equalise."""
        if ahead.ready is not None:
            ahead.ready.synchronize()  # recorded on the side stream only, normally a step ago
        kc, kt, kt_max = ahead.widths.tolist()
        _, batch_size, step, _ = ahead.key
        M = ahead.tgt.shape[0] // batch_size
        ctx_idx = _equalise(ahead.ctx, kc, self._key(step, _CONTEXT_KEEP))  # (B, Kc)
        tgt_key = self._key(step, _TARGET_KEEP) if kt_max > kt else None
        tgt_idx = _equalise(ahead.tgt, kt, tgt_key).view(M, batch_size, kt)  # (M, B, Kt)
        return MaskBatch(ctx_idx, tgt_idx)

    def __call__(self, batch_size: int, step: int, device: torch.device | str | None = None) -> MaskBatch:
        device = torch.device("cpu" if device is None else device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        ahead = self._ahead
        self._ahead = None
        if ahead is None or ahead.key != (self.seed, batch_size, step, device):
            ahead = None  # sampled for another step: the caller restarted or changed batch size
        if device.type != "cuda":
            batch = self._finish(ahead or self._start(batch_size, step, device))
            self._ahead = self._start(batch_size, step + 1, device)
            return batch
        side = self._streams.get(device.index)
        if side is None:  # high priority: the sampler's small kernels go ahead of the step's
            side = self._streams[device.index] = torch.cuda.Stream(device=device, priority=-1)
        current = torch.cuda.current_stream(device)
        with torch.cuda.stream(side):
            batch = self._finish(ahead or self._start(batch_size, step, device))
            current.wait_stream(side)  # this step's masks only: the next step's work follows
            self._ahead = self._start(batch_size, step + 1, device)
        batch.context.record_stream(current)  # allocated on the side stream, used on the current one
        batch.targets.record_stream(current)
        return batch


@dataclass
class _Ahead:
    """The blocks of one step, sampled before it is asked for, with its output widths on their
    way to the host."""

    key: tuple[int, int, int, torch.device]  # (seed, batch_size, step, device)
    ctx: torch.Tensor  # (B, H*W) bool
    tgt: torch.Tensor  # (M*B, H*W) bool
    widths: torch.Tensor  # (3,) int64 on the host (pinned on CUDA): Kc, Kt, largest target count
    ready: torch.cuda.Event | None  # recorded after the copy to the host (CUDA only)


def _equalise(mask: torch.Tensor, k: int, key: int | None) -> torch.Tensor:
    """[R, N] bool -> [R, k] int64 sorted: a uniformly random k-subset of each row's True entries
    (``key=None``: every row holds exactly k, take them all).

    Integer keys (kept flag, 32 random bits, patch index) are distinct, so the chosen subset does
    not depend on how a device's top-k breaks ties.
    """
    R, N = mask.shape
    keys = mask.long() << 48
    if key is not None:
        keys = keys | (hash_uint32(key, (R, N), mask.device) << 16)
    keys = keys | torch.arange(N, device=mask.device)
    return keys.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
