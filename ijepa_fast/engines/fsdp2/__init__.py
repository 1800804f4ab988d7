"""The FSDP2 engine (PyTorch's ``fully_shard``), in the modules it is made of:

- ``engine``: ``FSDP2Engine`` (``step.Engine``: sharding, the shard-local EMA, the finite checks);
- ``precision``: the mixed-precision policy (bf16 gathers, fp32 reduction, fp32 master weights);
- ``checkpoint``: ``torch.distributed.checkpoint`` folders, saved asynchronously, loaded on any
  number of ranks, and the consolidated copy for ``ijepa-eval``;
- ``safe_load``: DCP's reads made weights-only.

Importing this package imports none of them (``engines.engine_class("fsdp2")`` imports ``engine``).
"""
