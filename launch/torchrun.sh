#!/usr/bin/env bash
# The torchrun equivalent: one node (--standalone), or several with NNODES > 1 (run it on every node
# with its NODE_RANK and the same MASTER_ADDR).
#
#   NPROC_PER_NODE=8 launch/torchrun.sh --config configs/in1k_vith14_ep300.yaml data.root=/data/imagenet \
#       run.engine=deepspeed        # or run.engine=fsdp2 (PyTorch's fully_shard)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node01 NPROC_PER_NODE=8 launch/torchrun.sh --config ...   # on node01
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node01 NPROC_PER_NODE=8 launch/torchrun.sh --config ...   # on node02
#
# Environment: NPROC_PER_NODE (default: the GPU count, else 1), NNODES (1), NODE_RANK (0),
# MASTER_ADDR, MASTER_PORT (29500), PYTHON, IJEPA_DIST_TIMEOUT_S.
# CPU form (gloo): DS_ACCELERATOR=cpu NPROC_PER_NODE=2 launch/torchrun.sh --config ... run.device=cpu
set -euo pipefail
PYTHON=${PYTHON:-python}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ "$NPROC_PER_NODE" -ge 1 ]] || NPROC_PER_NODE=1
fi
args=(-m torch.distributed.run)
if [[ "${NNODES:-1}" -le 1 ]]; then
  args+=(--standalone)
else
  args+=(--nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR to node 0}"
         --master_port "${MASTER_PORT:-29500}")
fi
args+=(--nproc_per_node "$NPROC_PER_NODE" -m ijepa_fast.cli.pretrain)
if [[ -n "${IJEPA_LAUNCH_DRY_RUN:-}" ]]; then echo "$PYTHON ${args[*]} $*"; exit 0; fi
exec "$PYTHON" "${args[@]}" "$@"
