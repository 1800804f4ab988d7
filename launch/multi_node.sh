#!/usr/bin/env bash
# Several nodes from a hostfile, under the DeepSpeed launcher (run it on the first host; it starts the
# others over passwordless ssh with pdsh, so every host needs the same paths and environment).
#
#   HOSTFILE=hostfile launch/multi_node.sh --config configs/in1k_vith14_ep300.yaml data.root=/data/imagenet \
#       run.engine=deepspeed        # or run.engine=fsdp2 (PyTorch's fully_shard)
#
# hostfile, one line per node:   node01 slots=8
#                                node02 slots=8
# Environment: HOSTFILE (default ./hostfile), NUM_NODES and NUM_GPUS (per node; default: all of the
# hostfile), MASTER_ADDR (default: the hostfile's first host), MASTER_PORT (default 29500), PYTHON,
# DS_LAUNCHER_ARGS (e.g. "--launcher openmpi" or "--no_ssh --node_rank 1"), IJEPA_DIST_TIMEOUT_S.
# At start it prints the world layout (python -m ijepa_fast.cli.launch_plan) and passes the collective
# timeout it resolves (run.dist_timeout_s, else IJEPA_DIST_TIMEOUT_S, else 1800 s) to every process
# as run.dist_timeout_s: the remote hosts get it on the command line (the launcher's ssh does not
# forward IJEPA_* variables).
set -euo pipefail
PYTHON=${PYTHON:-python}
HOSTFILE=${HOSTFILE:-hostfile}
if [[ -z "${IJEPA_LAUNCH_DRY_RUN:-}" && ! -f "$HOSTFILE" ]]; then
  echo "multi_node.sh: hostfile '$HOSTFILE' not found (set HOSTFILE; lines like 'node01 slots=8')" >&2
  exit 2
fi
hosts() { if [[ -f "$HOSTFILE" ]]; then awk 'NF && $1 !~ /^#/' "$HOSTFILE"; fi; }
MASTER_ADDR=${MASTER_ADDR:-$(hosts | awk '{print $1; exit}')}
MASTER_PORT=${MASTER_PORT:-29500}
nodes=${NUM_NODES:-$(hosts | wc -l)}
per_node=${NUM_GPUS:-$(hosts | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) {sub(/slots=/, "", $i); print $i; exit}}')}
read -r TIMEOUT_S _ < <("$PYTHON" -m ijepa_fast.cli.launch_plan "$nodes" "${per_node:-0}" "$MASTER_ADDR:$MASTER_PORT" "$@" \
  || echo FAILED)
[[ "$TIMEOUT_S" != FAILED ]] || exit 2
args=(-m deepspeed.launcher.runner --hostfile "$HOSTFILE")
[[ -n "${NUM_NODES:-}" ]] && args+=(--num_nodes "$NUM_NODES")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")
args+=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
# shellcheck disable=SC2206
args+=(${DS_LAUNCHER_ARGS:-} --no_local_rank --module ijepa_fast.cli.pretrain)
if [[ -n "${IJEPA_LAUNCH_DRY_RUN:-}" ]]; then echo "$PYTHON ${args[*]} $* run.dist_timeout_s=$TIMEOUT_S"; exit 0; fi
exec "$PYTHON" "${args[@]}" "$@" "run.dist_timeout_s=$TIMEOUT_S"
