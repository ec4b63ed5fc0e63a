#!/usr/bin/env bash
# The public benchmark: pretrain a small model on the public human RNA corpus, then run every task of
# docs/benchmarks.md on the public datasets with all methods and 3 seeds, and collect the results into
# benchmarks/results/public.md + public.json.
#
#   bash benchmarks/run_public.sh            # full run (budgets below; about 3 hours on 2 free cores)
#   SEEDS="0" QUICK=1 bash benchmarks/run_public.sh   # a reduced run (1 seed, smaller budgets)
#
# The pretrained checkpoint goes to benchmarks/checkpoints/public-small/ (git-ignored) and is reused when
# present; each task's raw output goes to benchmarks/results/public_runs/<name>/ (results.json, report.md,
# plots). Environment: DATA (default ../shared/data), SEEDS, THREADS (torch threads, default 2), PY / AF,
# ONLY (a regex of run names, e.g. ONLY='modality|baron', to run a subset).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
AF=${AF:-.venv/bin/atlasformer}
DATA=${DATA:-../shared/data}
SEEDS=${SEEDS:-"0 1 2"}
THREADS=${THREADS:-2}
CKPT=benchmarks/checkpoints/public-small
RUNS=${RUNS:-benchmarks/results/public_runs}
export OMP_NUM_THREADS=$THREADS

# Budgets, chosen so that the whole script fits in about 3 hours on 2 cores:
#   pretraining: configs/pretrain/public_small.yaml (3.4M parameters, 3,000 steps of 32 cells, ~1 h);
#   fine-tuning (atlasformer and atlasformer_scratch alike): at most 300 steps of 32 cells per fit;
#   scVI / scvi-tools: 50 epochs (scvi-tools' default would be 400 here: hours on a CPU);
#   totalVI: scvi-tools' defaults (<= 400 epochs with early stopping; the paired files are small).
PRETRAIN_STEPS=${PRETRAIN_STEPS:-3000}
FINETUNE=(finetune.max_steps=${FINETUNE_STEPS:-300} finetune.epochs=50 finetune.lr=0.0003 scratch_lr=0.002
          scvi_epochs=${SCVI_EPOCHS:-50} threads=$THREADS)
if [[ "${QUICK:-0}" == "1" ]]; then
    PRETRAIN_STEPS=${PRETRAIN_STEPS_QUICK:-800}
    FINETUNE=(finetune.max_steps=120 finetune.epochs=50 finetune.lr=0.0003 scratch_lr=0.002 scvi_epochs=25
              totalvi_epochs=100 threads=$THREADS)
fi

# 1. pretraining corpus: every human RNA file (eccite_pbmc_500.rna is human but its gene names were lost:
#    var_names are row numbers, so it can share no token with the others; the mouse files are left out)
HUMAN=(kang_pbmc_8donors cellbench_lung_lines_5batches pbmc_10x_3chemistries pbmc4k_10x_v2 pbmc_sorted_reference
       pbmc_donorA_query kang_pbmc_ctrl_stim pbmc_celltypist_sample pbmc1k_cite.rna)
CORPUS=()
for name in "${HUMAN[@]}"; do CORPUS+=("$DATA/$name.h5ad"); done
if [[ ! -f "$CKPT/model/atlasformer.json" ]]; then
    start=$(date +%s)
    "$AF" pretrain --data "${CORPUS[@]}" --output "$CKPT" --config configs/pretrain/public_small.yaml \
        max_steps="$PRETRAIN_STEPS" threads="$THREADS"
    echo "pretraining took $(( $(date +%s) - start )) s" | tee "$CKPT/pretrain_seconds.txt"
else
    echo "reusing $CKPT/model"
fi
printf '%s\n' "${CORPUS[@]}" > "$CKPT/corpus.txt"

# 2. every task on the public datasets of docs/benchmarks.md, all methods, the seeds above
bench() {
    local name=$1; shift
    if [[ -n "${ONLY:-}" && ! "$name" =~ ${ONLY} ]]; then echo "$name: not selected (ONLY=$ONLY)"; return; fi
    local start; start=$(date +%s)
    "$AF" benchmark "$@" --model "$CKPT/model" --seeds $SEEDS --output "$RUNS/$name" "${FINETUNE[@]}"
    echo "$name: $(( $(date +%s) - start )) s"
}
bench annotation_kang --task annotation --data "$DATA/kang_pbmc_8donors.h5ad" --labels-key cell_type --batch-key batch
bench annotation_cellbench --task annotation --data "$DATA/cellbench_lung_lines_5batches.h5ad" --labels-key cell_line --batch-key batch
bench annotation_baron --task annotation --data "$DATA/baron_mouse_pancreas.h5ad" --labels-key cell_type --batch-key batch
bench integration_kang --task integration --data "$DATA/kang_pbmc_8donors.h5ad" --labels-key cell_type --batch-key batch
bench integration_cellbench --task integration --data "$DATA/cellbench_lung_lines_5batches.h5ad" --labels-key cell_line --batch-key batch
bench integration_baron --task integration --data "$DATA/baron_mouse_pancreas.h5ad" --labels-key cell_type --batch-key batch
bench imputation_kang --task imputation --data "$DATA/kang_pbmc_8donors.h5ad" --batch-key batch
bench imputation_pbmc4k --task imputation --data "$DATA/pbmc4k_10x_v2.h5ad"
bench modality_pbmc1k --task modality --data "$DATA/pbmc1k_cite.rna.h5ad" --paired "$DATA/pbmc1k_cite.protein.h5ad" --modality protein
bench modality_eccite --task modality --data "$DATA/eccite_pbmc_500.rna.h5ad" --paired "$DATA/eccite_pbmc_500.protein.h5ad" --modality protein --batch-key batch
bench modality_scicar --task modality --data "$DATA/scicar_mouse_kidney.rna.h5ad" --paired "$DATA/scicar_mouse_kidney.atac.h5ad" --modality atac --batch-key batch

# 3. one report over everything
"$PY" benchmarks/collect_results.py "$RUNS"/*/ --checkpoint "$CKPT" --output benchmarks/results/public \
    --budgets "pretraining ${PRETRAIN_STEPS} steps; ${FINETUNE[*]}; seeds ${SEEDS}"
