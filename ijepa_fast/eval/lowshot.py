"""Low-shot label subsets: a class-balanced, seeded part of the train split for probes trained on few labels.

Two protocols (``LowShot``):
- a fraction of the labels (``1%``): from each class, ``max(1, round(fraction x its images))`` images,
  so every class keeps its share (ImageNet-1k at 1%: 12 or 13 images of each class);
- N images per class (``5``): exactly N from each class; a class with fewer images is an error.

The images of each class are the first in one seeded permutation of the whole split, so the subset
depends on the labels and the seed only, and a larger N contains the smaller one's images.
``LabelSubset.to_dict`` records what a report needs to rebuild it: protocol, seed, per-class
counts and the indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowShot:
    """One low-shot protocol: ``fraction`` of each class's labels, or ``per_class`` images per class."""

    fraction: float | None = None
    per_class: int | None = None

    def __post_init__(self):
        if (self.fraction is None) == (self.per_class is None):
            raise ValueError("a low-shot protocol is either a fraction of the labels or a number of images per class")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"low-shot fraction {self.fraction} must lie in (0, 1]")
        if self.per_class is not None and self.per_class < 1:
            raise ValueError(f"low-shot images per class {self.per_class} must be at least 1")

    @classmethod
    def parse(cls, spec: str) -> LowShot:
        """``"1%"`` -> 1% of each class's labels; ``"5"`` -> 5 images per class."""
        text = spec.strip()
        try:
            if text.endswith("%"):
                return cls(fraction=float(text[:-1]) / 100)
            return cls(per_class=int(text))
        except ValueError as err:
            raise ValueError(
                f"low-shot {spec!r}: give a percentage of the labels (1%) or images per class (5): {err}"
            ) from None

    @property
    def name(self) -> str:
        if self.fraction is not None:
            return f"{100 * self.fraction:g}% of the labels"
        return f"{self.per_class} per class"


@dataclass(frozen=True)
class LabelSubset:
    protocol: LowShot
    seed: int
    indices: torch.Tensor  # [n] int64, ascending: rows of the train split
    per_class: dict[int, int]  # class -> images taken

    def to_dict(self) -> dict:
        return {
            "protocol": self.protocol.name,
            "fraction": self.protocol.fraction,
            "images_per_class": self.protocol.per_class,
            "seed": self.seed,
            "n": len(self.indices),
            "per_class_counts": {str(c): k for c, k in self.per_class.items()},
            "indices": self.indices.tolist(),
        }


def label_subset(labels: torch.Tensor, protocol: LowShot, seed: int = 0) -> LabelSubset:
    """The rows of ``labels`` [N] that ``protocol`` keeps: class-balanced, seeded by ``seed``."""
    labels = labels.to("cpu", torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    shuffled = labels[order]
    chosen, taken = [], {}
    for c in torch.unique(labels).tolist():
        rows = order[shuffled == c]  # this class's rows, in the seeded order
        k = protocol.per_class if protocol.per_class is not None else max(1, round(protocol.fraction * len(rows)))
        if k > len(rows):
            raise ValueError(f"class {c} has {len(rows)} train images, fewer than the {k} that {protocol.name} takes")
        chosen.append(rows[:k])
        taken[c] = k
    indices = torch.cat(chosen).sort().values if chosen else torch.empty(0, dtype=torch.int64)
    return LabelSubset(protocol, seed, indices, taken)
