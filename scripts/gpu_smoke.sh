#!/usr/bin/env bash
# GPU smoke test: run once on the first machine with a GPU. Everything here has CPU tests (docs/pretraining.md,
# "What is tested on CPU"); this script checks what only a GPU can: CUDA kernels, NCCL, bf16 on device.
#
#   bash scripts/gpu_smoke.sh                 # 1 GPU, and 2 GPUs where the machine has them
#   GPUS="1" bash scripts/gpu_smoke.sh        # one GPU only
#   STRATEGIES="ddp fsdp" bash scripts/gpu_smoke.sh
#
# For each GPU count and strategy (ddp, fsdp, deepspeed ZeRO-2 and ZeRO-3): pretrain 20 steps in bf16 with
# flash-capable attention (sdpa_backend=auto), stop, resume to 30 steps and check the run continued from
# step 20; then fine-tune annotation and integration (mode=full, condition tokens) with the same process
# count, predict and embed on the GPU, and check every output folder loads. A last pair of runs checks that
# sdpa_backend=flash runs on unpadded batches. Logs and outputs go to OUT (default runs/gpu_smoke); the
# script stops at the first failure and prints PASS per step.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
AF=${AF:-.venv/bin/atlasformer}
OUT=${OUT:-runs/gpu_smoke}
STRATEGIES=${STRATEGIES:-"ddp fsdp deepspeed2 deepspeed3"}
TORCHRUN=${TORCHRUN:-"$PY -m torch.distributed.run"}

n_gpus=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if (( n_gpus == 0 )); then
    echo "gpu_smoke: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')); install a CUDA" \
         "build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu124) and run on a GPU machine." >&2
    exit 1
fi
GPUS=${GPUS:-$( (( n_gpus >= 2 )) && echo "1 2" || echo "1")}
mkdir -p "$OUT"
pass() { echo "PASS $*"; }

# simulated cells: two batches, five cell types (the quickstart's generator)
"$PY" - "$OUT/cells.h5ad" <<'EOF'
import sys
from atlasformer.tokenization import simulate_counts
simulate_counts(n_cells=3000, n_genes=800, seed=0).write_h5ad(sys.argv[1])
EOF

launch() {  # launch N_PROCS atlasformer-arguments...: one process per GPU under torchrun
    local n=$1; shift
    # shellcheck disable=SC2086  # TORCHRUN is a command with arguments
    $TORCHRUN --standalone --nproc_per_node "$n" -m atlasformer.cli "$@"
}
strategy_args() {
    case $1 in
        ddp) echo "strategy=ddp" ;;
        fsdp) echo "strategy=fsdp" ;;
        deepspeed2) echo "strategy=deepspeed zero_stage=2" ;;
        deepspeed3) echo "strategy=deepspeed zero_stage=3" ;;
    esac
}
last_step() { "$PY" -c "import json,sys; print(max(json.loads(l)['step'] for l in open(sys.argv[1]) if l.strip()))" "$1"; }

for n in $GPUS; do
    for strategy in $STRATEGIES; do
        run="$OUT/pretrain-${n}gpu-$strategy"
        # shellcheck disable=SC2046  # strategy_args gives words
        launch "$n" pretrain --data "$OUT/cells.h5ad" --output "$run" --config configs/pretrain/tiny.yaml --overwrite \
            precision=bf16 max_steps=20 save_every=10 $(strategy_args "$strategy") > "$run.log" 2>&1
        grep -q "on cuda" "$run.log" || { echo "FAIL $run: did not run on cuda (see $run.log)"; exit 1; }
        [[ $(last_step "$run/metrics.jsonl") == 20 ]] || { echo "FAIL $run: did not reach step 20"; exit 1; }
        pass "pretrain $n GPU(s) $strategy bf16, 20 steps"
        # shellcheck disable=SC2046
        launch "$n" pretrain --data "$OUT/cells.h5ad" --output "$run" --config configs/pretrain/tiny.yaml --resume \
            precision=bf16 max_steps=30 save_every=10 $(strategy_args "$strategy") > "$run.resume.log" 2>&1
        grep -q "resum" "$run.resume.log" && [[ $(last_step "$run/metrics.jsonl") == 30 ]] \
            || { echo "FAIL $run: resume did not continue to step 30 (see $run.resume.log)"; exit 1; }
        pass "resume $n GPU(s) $strategy to step 30"
    done
    model="$OUT/pretrain-${n}gpu-ddp/model"
    for task in annotation integration; do
        ft="$OUT/finetune-${n}gpu-$task"
        launch "$n" finetune "$task" --model "$model" --data "$OUT/cells.h5ad" --labels-key cell_type --batch-key batch \
            --output "$ft" --overwrite finetune.mode=full finetune.precision=bf16 finetune.max_steps=20 > "$ft.log" 2>&1
        "$PY" -c "import atlasformer, sys; atlasformer.from_pretrained(sys.argv[1])" "$ft/model"
        pass "finetune $task on $n GPU(s), mode=full, bf16"
    done
done

ft="$OUT/finetune-1gpu-annotation"
"$AF" -v predict --model "$ft/model" --data "$OUT/cells.h5ad" --output "$OUT/predict" --overwrite > "$OUT/predict.log" 2>&1
grep -q "model on cuda" "$OUT/predict.log" || { echo "FAIL predict: did not run on the GPU (see $OUT/predict.log)"; exit 1; }
pass "predict on the GPU"
"$AF" -v embed --model "$OUT/pretrain-1gpu-ddp/model" --data "$OUT/cells.h5ad" --output "$OUT/embed" --overwrite \
    > "$OUT/embed.log" 2>&1
grep -q "model on cuda" "$OUT/embed.log" || { echo "FAIL embed: did not run on the GPU (see $OUT/embed.log)"; exit 1; }
pass "embed on the GPU"

# flash attention: unpadded batches (every cell at the gene cap) take no mask, so the flash kernel can run
launch 1 pretrain --data "$OUT/cells.h5ad" --output "$OUT/pretrain-flash" --config configs/pretrain/tiny.yaml --overwrite \
    precision=bf16 max_steps=10 sdpa_backend=flash tokenizer.max_seq_len=32 > "$OUT/pretrain-flash.log" 2>&1
pass "sdpa_backend=flash, bf16"
echo "gpu_smoke: all steps passed; logs in $OUT"
