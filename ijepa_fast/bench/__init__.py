"""The profiling harness of the training step (``ijepa-bench`` is its command line): throughput,
MFU, phase split, ablation, GPU-hours.

``sources`` (what is timed: the spec, the rows, the batches), ``timing`` (the clocks: steps,
phases, trace, the matmul ceiling), ``measure`` (one configuration built, warmed up and timed; the
run over all of them), ``paper`` (the paper's runs, the devices' bf16 peaks, the GPU-hours
projection), ``report`` (Markdown, JSON, plots, the commit and command they record)."""
