"""Seeded random streams shared by the loaders, the crops and the mask samplers.

Every random draw of a run is a pure function of (seed, step or epoch, index): a resumed run, a
different worker count or another loader draws the same numbers. Nothing here touches the
process's global generators.
"""

from __future__ import annotations

import random

_MASK64 = 2**64 - 1


def mix(seed: int, step: int) -> int:
    """splitmix64 of (seed, step): independent 63-bit seeds for neighbouring steps and seeds."""
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & (2**63 - 1)


def mask_seed(seed: int, rank: int) -> int:
    """The mask sampler's seed on ``rank``: ``seed`` itself on rank 0 (a one-process run is unchanged),
    an independent stream on every other rank, so the ranks of one step draw different masks."""
    return seed if rank == 0 else mix(seed, 0x5EED0000 + rank) & 0x7FFFFFFFFFFF


def crop_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The crop generator of dataset item ``index`` in ``epoch``."""
    return random.Random(mix(seed, epoch * 1_000_003 + index))
