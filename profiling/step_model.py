"""The step model's predicted milliseconds per phase on an H100, for the default and each speed switch.

The same as ``ijepa-bench --model-step``; the model is ``ijepa_fast.models.step_model``. E.g.::

    python -m profiling.step_model                                # ViT-H/14, 224 px, batch 128
    python -m profiling.step_model --config vitb16_in1k data.batch_size=256
"""

from __future__ import annotations

import sys

from ijepa_fast.cli.bench import main

if __name__ == "__main__":
    sys.exit(main(["--model-step", *sys.argv[1:]]))
