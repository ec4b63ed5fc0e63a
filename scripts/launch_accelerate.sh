#!/usr/bin/env bash
# Pretraining under `accelerate launch` with a config from configs/accelerate/.
#
# One node, 8 GPUs, DDP:
#   scripts/launch_accelerate.sh --data corpus/ --output runs/base --config configs/pretrain/base.yaml
# FSDP or DeepSpeed: pick the matching accelerate config and pass the same strategy to atlasformer:
#   ACCELERATE_CONFIG=configs/accelerate/fsdp_8gpu.yaml scripts/launch_accelerate.sh ... strategy=fsdp
#   ACCELERATE_CONFIG=configs/accelerate/deepspeed_zero3_8gpu.yaml scripts/launch_accelerate.sh ... strategy=deepspeed
# N nodes (the same command on every node, NODE_RANK 0..N-1):
#   ACCELERATE_CONFIG=configs/accelerate/ddp_multinode.yaml NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 \
#     scripts/launch_accelerate.sh ...
#
# Environment: ACCELERATE_CONFIG (default configs/accelerate/ddp_8gpu.yaml), NNODES (1), NODE_RANK (0),
# GPUS_PER_NODE (8), MASTER_ADDR, MASTER_PORT (29500), ACCELERATE (default: accelerate launch).
# Run from the repository root: DeepSpeed configs name their JSON file relative to it.
set -euo pipefail

CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/ddp_8gpu.yaml}
ACCELERATE=${ACCELERATE:-accelerate launch}
NNODES=${NNODES:-1}
ARGS=(--config_file "$CONFIG")
if [[ "$NNODES" -gt 1 ]]; then
    : "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
    ARGS+=(--num_machines "$NNODES" --machine_rank "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
           --num_processes $((NNODES * ${GPUS_PER_NODE:-8}))
           --main_process_ip "$MASTER_ADDR" --main_process_port "${MASTER_PORT:-29500}")
elif [[ -n "${MASTER_PORT:-}" ]]; then
    ARGS+=(--main_process_port "$MASTER_PORT")
fi
# shellcheck disable=SC2086  # ACCELERATE may be a command with arguments
exec $ACCELERATE "${ARGS[@]}" -m atlasformer.cli pretrain "$@"
