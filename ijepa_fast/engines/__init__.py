"""Engines: what owns the student's weights and optimizer (the ``train.step.Engine`` protocol).

``plain`` is one process with a torch AdamW; ``deepspeed`` is DeepSpeed ZeRO 0-3 over the ranks a
launcher started; ``fsdp2`` is PyTorch's ``fully_shard`` over them (any number, one included), with
checkpoints through ``torch.distributed.checkpoint``. A run's models, engine and step are put together
in ``ijepa_fast.train.build``.
"""

from __future__ import annotations

from ijepa_fast.config.choices import ENGINES


def resolve_engine(engine: str, world_size: int) -> str:
    """``auto`` -> deepspeed under a multi-process launcher, plain otherwise (never fsdp2: ask for it
    by name); plain with several processes is refused (the plain engine has no data parallelism)."""
    if engine not in ENGINES:
        raise ValueError(f"run.engine={engine!r}: choose one of {ENGINES}")
    if engine == "auto":
        return "deepspeed" if world_size > 1 else "plain"
    if engine == "plain" and world_size > 1:
        raise ValueError(
            f"run.engine=plain is single-process but the launcher started {world_size} processes: "
            f"use run.engine=deepspeed (run.zero_stage=0 is plain data parallelism) or run.engine=fsdp2"
        )
    return engine


def engine_class(name: str) -> type:
    """The class of a resolved engine name (its module imported on demand)."""
    if name not in ENGINES or name == "auto":
        raise ValueError(f"no engine class for {name!r}: resolve run.engine first (resolve_engine)")
    if name == "deepspeed":
        from ijepa_fast.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine
    if name == "fsdp2":
        from ijepa_fast.engines.fsdp2.engine import FSDP2Engine

        return FSDP2Engine
    from ijepa_fast.engines.plain import PlainEngine

    return PlainEngine
