#!/usr/bin/env bash
# Pretraining under torchrun, on one node or on several with a c10d rendezvous.
#
# One node, 8 GPUs:
#   scripts/launch_torchrun.sh --data corpus/ --output runs/base --config configs/pretrain/base.yaml
# N nodes (run the same command on every node; node 0's address as MASTER_ADDR):
#   NNODES=4 MASTER_ADDR=node0.cluster scripts/launch_torchrun.sh --data ... --output ... --config ... strategy=fsdp
# With NODE_RANK set on each node (0 on MASTER_ADDR's node), a static rendezvous instead of c10d: no node may
# join late, but a finished job cannot fail on torch's c10d shutdown race (a non-host agent polling the
# rendezvous store after the host's agent has exited, which ends a successful run with exit code 1).
#
# Environment: NPROC_PER_NODE (default: the GPU count, else 1), NNODES (1), MASTER_ADDR, MASTER_PORT
# (29500), NODE_RANK (static rendezvous), RDZV_ID (a job id shared by all nodes, c10d), TORCHRUN (default:
# torchrun). Arguments are those of `atlasformer pretrain`. With --resume a restarted job continues from its
# latest complete checkpoint.
set -euo pipefail

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
NNODES=${NNODES:-1}
TORCHRUN=${TORCHRUN:-torchrun}

if [[ "$NNODES" -eq 1 ]]; then
    # --standalone: a local rendezvous on a free port
    # shellcheck disable=SC2086  # TORCHRUN may be a command with arguments
    exec $TORCHRUN --standalone --nproc_per_node "$NPROC_PER_NODE" -m atlasformer.cli pretrain "$@"
fi

: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0 (the rendezvous host)}"
if [[ -n "${NODE_RANK:-}" ]]; then
    # shellcheck disable=SC2086
    exec $TORCHRUN \
        --nnodes "$NNODES" \
        --nproc_per_node "$NPROC_PER_NODE" \
        --node_rank "$NODE_RANK" \
        --master_addr "$MASTER_ADDR" \
        --master_port "${MASTER_PORT:-29500}" \
        -m atlasformer.cli pretrain "$@"
fi
# shellcheck disable=SC2086
exec $TORCHRUN \
    --nnodes "$NNODES" \
    --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" \
    --rdzv_id "${RDZV_ID:-atlasformer}" \
    -m atlasformer.cli pretrain "$@"
