"""Step benchmark: images/s, MFU, phase split, ablation and GPU-hours of the training step.

A thin command line over ``ijepa_fast.bench`` (also installed as ``ijepa-bench``); see that
module for what is measured and how. Run from the repository root, e.g.::

    python -m profiling.bench_step --model vit_huge --patch 14 --img 224 --batch 128 --ablation \\
        --out profiling/out --record
    python -m profiling.bench_step --model vit_tiny --patch 8 --img 64 --batch 8 --steps 5   # CPU, seconds
"""

from __future__ import annotations

import sys

from ijepa_fast.bench import main

if __name__ == "__main__":
    sys.exit(main())
