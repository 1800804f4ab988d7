"""The DeepSpeed ZeRO engine (stages 0-3), in the modules it is made of:

- ``config``: the DeepSpeed config of a run, generated from ours and merged with ``run.ds_config``;
- ``engine``: ``DeepSpeedEngine`` (``step.Engine``: the step's calls, the EMA views, checkpoints,
  the consolidated export);
- ``files``: the checkpoints folder without an engine (tags, ``latest``, per-rank files, partial
  files, the conversion of a tag for another number of ranks);
- ``universal``: DeepSpeed's universal checkpoint, written and read weights-only;
- ``patches``: every patch of a DeepSpeed internal, each pinned to the DeepSpeed release it was
  written against.

Importing this package does not import DeepSpeed; building an engine does.
"""

from ijepa_fast.engines.deepspeed.config import (
    compile_refusal,
    deepspeed_config,
    global_batch,
    load_user_config,
    target_config,
)
from ijepa_fast.engines.deepspeed.engine import DeepSpeedEngine
from ijepa_fast.engines.deepspeed.files import (
    convert_to_universal,
    latest_step,
    list_tags,
    remove_partial_files_in,
    saved_world_size,
)
from ijepa_fast.engines.deepspeed.patches import deepspeed_safe_globals

__all__ = [
    "DeepSpeedEngine",
    "compile_refusal",
    "convert_to_universal",
    "deepspeed_config",
    "deepspeed_safe_globals",
    "global_batch",
    "latest_step",
    "list_tags",
    "load_user_config",
    "remove_partial_files_in",
    "saved_world_size",
    "target_config",
]
