#!/usr/bin/env bash
# One node, one process per GPU, under the DeepSpeed launcher.
#
#   NUM_GPUS=8 launch/single_node.sh --config configs/in1k_vith14_ep300.yaml data.root=/data/imagenet \
#       run.engine=deepspeed run.zero_stage=2   # or run.engine=fsdp2 (PyTorch's fully_shard)
#
# Environment: NUM_GPUS (default: every visible GPU), MASTER_PORT (default 29500), PYTHON (default
# python), DS_LAUNCHER_ARGS (more launcher flags), IJEPA_DIST_TIMEOUT_S (collective timeout, s).
# CPU form (gloo): DS_ACCELERATOR=cpu NUM_GPUS=2 launch/single_node.sh --config ... run.device=cpu
# Everything after the script name goes to `python -m ijepa_fast.cli.pretrain` (--config, --resume,
# section.key=value overrides).
set -euo pipefail
PYTHON=${PYTHON:-python}
args=(-m deepspeed.launcher.runner)
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")
args+=(--master_port "${MASTER_PORT:-29500}")
# shellcheck disable=SC2206  # DS_LAUNCHER_ARGS is a list of flags
args+=(${DS_LAUNCHER_ARGS:-} --no_local_rank --module ijepa_fast.cli.pretrain)
if [[ -n "${IJEPA_LAUNCH_DRY_RUN:-}" ]]; then echo "$PYTHON ${args[*]} $*"; exit 0; fi
exec "$PYTHON" "${args[@]}" "$@"
