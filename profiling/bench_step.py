"""Step benchmark: images/s, MFU, phase split, ablation and GPU-hours of the training step.

A thin command line over ``ijepa_fast.cli.bench`` (also installed as ``ijepa-bench``); the library,
``ijepa_fast.bench``, says what is measured and how. Run from the repository root, e.g.::

    python -m profiling.bench_step --ablation --out profiling/out --record      # ViT-H/14, 224 px, batch 128
    python -m profiling.bench_step --config demo run.device=cpu --steps 5      # the CPU demo's model, seconds
"""

from __future__ import annotations

import sys

from ijepa_fast.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
