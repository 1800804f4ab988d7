"""The multi-block mask sampler (CPU) and its device twin that runs a step ahead."""
