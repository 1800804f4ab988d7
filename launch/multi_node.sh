#!/usr/bin/env bash
# Several nodes from a hostfile, under the DeepSpeed launcher (run it on the first host; it starts the
# others over passwordless ssh with pdsh, so every host needs the same paths and environment).
#
#   HOSTFILE=hostfile launch/multi_node.sh --config configs/in1k_vith14_ep300.yaml data.root=/data/imagenet \
#       run.engine=deepspeed
#
# hostfile, one line per node:   node01 slots=8
#                                node02 slots=8
# Environment: HOSTFILE (default ./hostfile), NUM_NODES and NUM_GPUS (default: all of the hostfile),
# MASTER_ADDR (default: the hostfile's first host), MASTER_PORT (default 29500), PYTHON,
# DS_LAUNCHER_ARGS (e.g. "--launcher openmpi" or "--no_ssh --node_rank 1"), IJEPA_DIST_TIMEOUT_S.
set -euo pipefail
PYTHON=${PYTHON:-python}
HOSTFILE=${HOSTFILE:-hostfile}
if [[ -z "${IJEPA_LAUNCH_DRY_RUN:-}" && ! -f "$HOSTFILE" ]]; then
  echo "multi_node.sh: hostfile '$HOSTFILE' not found (set HOSTFILE; lines like 'node01 slots=8')" >&2
  exit 2
fi
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
args=(-m deepspeed.launcher.runner --hostfile "$HOSTFILE")
[[ -n "${NUM_NODES:-}" ]] && args+=(--num_nodes "$NUM_NODES")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")
args+=(--master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
# shellcheck disable=SC2206
args+=(${DS_LAUNCHER_ARGS:-} --no_local_rank --module ijepa_fast.pretrain)
if [[ -n "${IJEPA_LAUNCH_DRY_RUN:-}" ]]; then echo "$PYTHON ${args[*]} $*"; exit 0; fi
exec "$PYTHON" "${args[@]}" "$@"
