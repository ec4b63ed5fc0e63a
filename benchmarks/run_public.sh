#!/usr/bin/env bash
# The public benchmark: pretrain a small model on the public human RNA corpus, then run every task of
# docs/benchmarks.md on the public datasets with all methods and 3 seeds, and collect the results into
# benchmarks/results/public.md + public.json.
#
#   bash benchmarks/run_public.sh            # full run (budgets below; more than 2 hours on 2 cores: on
#                                            # 2026-11-22, under load, pretraining took 27 min and the runs
#                                            # over 95 min; on a quiet machine pretraining took 17 min)
#   SEEDS="0" QUICK=1 bash benchmarks/run_public.sh   # a reduced run (1 seed, smaller budgets)
#
# The pretrained checkpoint goes to benchmarks/checkpoints/public-small/ (git-ignored) and is reused when
# present; each task's raw output goes to benchmarks/results/public_runs/<name>/ (results.json, report.md,
# plots). Environment: DATA (default ../shared/data), SEEDS, THREADS (torch threads per run, default 1), PY / AF,
# REFERENCE (0 leaves out the scvi_tools method), JOBS (benchmark runs side by side, default 2), ONLY (a regex
# of run names, e.g. ONLY='modality|baron', to run a subset), METHODS (run only these methods, where they apply,
# e.g. METHODS=atlasformer with RUNS=<another folder> to rerun one method; merge it with collect_results.py
# --replace), RUNS (the runs' folder), REPORT (the collected report's path without suffix).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
AF=${AF:-.venv/bin/atlasformer}
DATA=${DATA:-../shared/data}
SEEDS=${SEEDS:-"0 1 2"}
THREADS=${THREADS:-1}
JOBS=${JOBS:-2}
PRETRAIN_THREADS=${PRETRAIN_THREADS:-2}
CKPT=benchmarks/checkpoints/public-small
RUNS=${RUNS:-benchmarks/results/public_runs}
REPORT=${REPORT:-benchmarks/results/public}
export OMP_NUM_THREADS=$THREADS NUMBA_NUM_THREADS=$THREADS

# Budgets, chosen so that the whole script fits in about 3 hours on 2 cores:
#   pretraining: configs/pretrain/public_small.yaml (4,000 steps of 32 cells: 17 min on 2 quiet cores, measured);
#   fine-tuning (atlasformer and atlasformer_scratch alike): at most FINETUNE_STEPS steps of 32 cells per fit
#   (about 100 fits: folds x seeds x the two methods);
#   scVI / scvi-tools: 50 epochs (scvi-tools' default would be 400 here: hours on a CPU);
#   totalVI: at most 200 epochs with early stopping.
#   fine-tuning learning rate 2e-3 for the pretrained model as for scratch: at 3e-4, 150 steps left the
#   pretrained model under-trained (seed 0 annotation accuracy 0.707 on cellbench and 0.689 on kang, against
#   0.908 and 0.745 at 2e-3, measured 2026-12-05).
PRETRAIN_STEPS=${PRETRAIN_STEPS:-4000}
FINETUNE=(finetune.max_steps=${FINETUNE_STEPS:-150} finetune.epochs=50 finetune.lr=${FINETUNE_LR:-0.002} scratch_lr=0.002
          scvi_epochs=${SCVI_EPOCHS:-50} totalvi_epochs=${TOTALVI_EPOCHS:-200} threads=$THREADS)
if [[ "${QUICK:-0}" == "1" ]]; then
    PRETRAIN_STEPS=${PRETRAIN_STEPS_QUICK:-800}
    FINETUNE=(finetune.max_steps=120 finetune.epochs=50 finetune.lr=${FINETUNE_LR:-0.002} scratch_lr=0.002 scvi_epochs=25
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
    OMP_NUM_THREADS=$PRETRAIN_THREADS "$AF" pretrain --data "${CORPUS[@]}" --output "$CKPT" \
        --config configs/pretrain/public_small.yaml max_steps="$PRETRAIN_STEPS" threads="$PRETRAIN_THREADS"
    echo "pretraining took $(( $(date +%s) - start )) s" | tee "$CKPT/pretrain_seconds.txt"
else
    echo "reusing $CKPT/model"
fi
printf '%s\n' "${CORPUS[@]}" > "$CKPT/corpus.txt"

# 2. every task on the public datasets of docs/benchmarks.md, all methods, the seeds above. JOBS runs go side
#    by side, each with THREADS torch threads (small models use 1 thread better than 2); the longest first.
# scvi_tools (the reference package) is left out with REFERENCE=0, e.g. where the budget is short
methods() {
    local task=$1 reference=""
    if [[ -n "${METHODS:-}" ]]; then echo "$METHODS"; return; fi
    [[ "${REFERENCE:-1}" == "1" && $task != modality ]] && reference=scvi_tools
    case $task in
        annotation) echo "atlasformer atlasformer_scratch atlasformer_zeroshot scvi logreg pca_knn $reference" ;;
        integration) echo "atlasformer atlasformer_scratch atlasformer_zeroshot scvi pca harmony $reference" ;;
        imputation) echo "atlasformer atlasformer_scratch atlasformer_zeroshot scvi no_denoising knn_smoothing $reference" ;;
        modality) echo "atlasformer atlasformer_scratch atlasformer_zeroshot totalvi mean ridge knn" ;;
    esac
}
bench() {
    local name=$1; shift
    if [[ -n "${ONLY:-}" && ! "$name" =~ ${ONLY} ]]; then echo "$name: not selected (ONLY=$ONLY)"; return; fi
    local start; start=$(date +%s)
    mkdir -p "$RUNS/$name"
    # shellcheck disable=SC2046  # the method names are words
    "$AF" benchmark "$@" --methods $(methods "$2") --model "$CKPT/model" --seeds $SEEDS --output "$RUNS/$name" \
        "${FINETUNE[@]}" \
        > "$RUNS/$name/log.txt" 2>&1 || { echo "$name: FAILED after $(( $(date +%s) - start )) s (see $RUNS/$name/log.txt)"; return 1; }
    echo "$name: $(( $(date +%s) - start )) s"
}
RUNS_LIST=(
  "annotation_kang --task annotation --data $DATA/kang_pbmc_8donors.h5ad --labels-key cell_type --batch-key batch"
  "integration_kang --task integration --data $DATA/kang_pbmc_8donors.h5ad --labels-key cell_type --batch-key batch"
  "annotation_cellbench --task annotation --data $DATA/cellbench_lung_lines_5batches.h5ad --labels-key cell_line --batch-key batch"
  "annotation_baron --task annotation --data $DATA/baron_mouse_pancreas.h5ad --labels-key cell_type --batch-key batch"
  "imputation_kang --task imputation --data $DATA/kang_pbmc_8donors.h5ad --batch-key batch"
  "imputation_pbmc4k --task imputation --data $DATA/pbmc4k_10x_v2.h5ad"
  "modality_scicar --task modality --data $DATA/scicar_mouse_kidney.rna.h5ad --paired $DATA/scicar_mouse_kidney.atac.h5ad --modality atac --batch-key batch"
  "integration_cellbench --task integration --data $DATA/cellbench_lung_lines_5batches.h5ad --labels-key cell_line --batch-key batch"
  "integration_baron --task integration --data $DATA/baron_mouse_pancreas.h5ad --labels-key cell_type --batch-key batch"
  "modality_pbmc1k --task modality --data $DATA/pbmc1k_cite.rna.h5ad --paired $DATA/pbmc1k_cite.protein.h5ad --modality protein"
  "modality_eccite --task modality --data $DATA/eccite_pbmc_500.rna.h5ad --paired $DATA/eccite_pbmc_500.protein.h5ad --modality protein --batch-key batch"
)
failed=0
running=0
for run in "${RUNS_LIST[@]}"; do
    # shellcheck disable=SC2086  # each entry is a name followed by its flags
    bench $run &
    running=$((running + 1))
    if (( running >= JOBS )); then wait -n || failed=1; running=$((running - 1)); fi
done
while (( running > 0 )); do wait -n || failed=1; running=$((running - 1)); done

# 3. one report over everything
[[ $failed == 0 ]] || echo "some runs failed; the report covers the others"
"$PY" benchmarks/collect_results.py "$RUNS"/*/ --checkpoint "$CKPT" --output "$REPORT" \
    --budgets "pretraining ${PRETRAIN_STEPS} steps; ${FINETUNE[*]}; seeds ${SEEDS}; scvi_tools $(
        [[ "${REFERENCE:-1}" == "1" ]] && echo included || echo 'left out (REFERENCE=0)')" \
    --conditions "${JOBS} benchmark runs went side by side on the machine's cores, ${THREADS} torch thread(s) each."
