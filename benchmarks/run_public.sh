#!/usr/bin/env bash
# The public benchmark: every task of docs/benchmarks.md on the public datasets, all methods, 3 seeds, with the
# model that ships with the package (atlasformer-public-small) and the fine-tuning defaults of `atlasformer
# finetune` (each task's recipe, docs/model_quality.md): no fine-tuning override is passed, so this is what
# a held-out run with the defaults gets. Results are collected into benchmarks/results/public.md + public.json.
#
#   bash benchmarks/run_public.sh            # full run
#   SEEDS="0" bash benchmarks/run_public.sh  # one seed
#
# Each task's raw output goes to benchmarks/results/public_runs/<name>/ (results.json, report.md, plots).
# Environment: DATA (default ../shared/data), MODEL (default atlasformer-public-small; a folder to benchmark
# another checkpoint), SEEDS, THREADS (torch threads per run, default 1), PY / AF, REFERENCE (0 leaves out the
# scvi_tools method), JOBS (benchmark runs side by side, default 2), ONLY (a regex of run names, e.g.
# ONLY='modality|baron', to run a subset), METHODS (run only these methods, where they apply, e.g.
# METHODS=atlasformer with RUNS=<another folder> to rerun one method; merge it with collect_results.py
# --replace), RUNS (the runs' folder), REPORT (the collected report's path without suffix).
# The shipped model is rebuilt from its config and seed by scripts/build_public_model.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
AF=${AF:-.venv/bin/atlasformer}
DATA=${DATA:-../shared/data}
MODEL=${MODEL:-atlasformer-public-small}
SEEDS=${SEEDS:-"0 1 2"}
THREADS=${THREADS:-1}
JOBS=${JOBS:-2}
RUNS=${RUNS:-benchmarks/results/public_runs}
REPORT=${REPORT:-benchmarks/results/public}
export OMP_NUM_THREADS=$THREADS NUMBA_NUM_THREADS=$THREADS

# Budgets of the VAE baselines only (scvi-tools' epoch heuristic would be 400 here: hours on a CPU); atlasformer
# and atlasformer_scratch run at the defaults.
BUDGETS=(scvi_epochs=${SCVI_EPOCHS:-50} totalvi_epochs=${TOTALVI_EPOCHS:-200} threads=$THREADS)

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
# The ablations (what the expression path and the pretrained embedding each add) run in a second pass with
# ABLATION_SEEDS (default seed 0 alone, for time: the frozen closed-form heads give the same result at every
# seed), into $RUNS/ablations/, merged into the report with collect_results.py --replace.
ABLATIONS="atlasformer_no_expression atlasformer_expression_only"
ABLATION_SEEDS=${ABLATION_SEEDS:-0}
bench() {  # bench OUTPUT_DIR METHODS SEEDS NAME FLAGS...
    local out=$1 chosen=$2 seeds=$3 name=$4; shift 4
    if [[ -n "${ONLY:-}" && ! "$name" =~ ${ONLY} ]]; then echo "$name: not selected (ONLY=$ONLY)"; return; fi
    local start; start=$(date +%s)
    rm -rf "${out:?}/$name" && mkdir -p "$out/$name"  # this script owns its run folders: a rerun starts clean (--overwrite: only its log.txt is there)
    # shellcheck disable=SC2086  # the method names and seeds are words
    "$AF" benchmark "$@" --methods $chosen --model "$MODEL" --seeds $seeds --output "$out/$name" --overwrite \
        "${BUDGETS[@]}" \
        > "$out/$name/log.txt" 2>&1 || { echo "$name: FAILED after $(( $(date +%s) - start )) s (see $out/$name/log.txt)"; return 1; }
    echo "$name: $(( $(date +%s) - start )) s"
}
RUNS_LIST=(
  "annotation_kang --task annotation --data $DATA/kang_pbmc_8donors.h5ad --labels-key cell_type --batch-key batch"
  "imputation_pbmc4k --task imputation --data $DATA/pbmc4k_10x_v2.h5ad"
  "integration_kang --task integration --data $DATA/kang_pbmc_8donors.h5ad --labels-key cell_type --batch-key batch"
  "annotation_cellbench --task annotation --data $DATA/cellbench_lung_lines_5batches.h5ad --labels-key cell_line --batch-key batch"
  "annotation_baron --task annotation --data $DATA/baron_mouse_pancreas.h5ad --labels-key cell_type --batch-key batch"
  "imputation_kang --task imputation --data $DATA/kang_pbmc_8donors.h5ad --batch-key batch"
  "modality_scicar --task modality --data $DATA/scicar_mouse_kidney.rna.h5ad --paired $DATA/scicar_mouse_kidney.atac.h5ad --modality atac --batch-key batch"
  "integration_cellbench --task integration --data $DATA/cellbench_lung_lines_5batches.h5ad --labels-key cell_line --batch-key batch"
  "integration_baron --task integration --data $DATA/baron_mouse_pancreas.h5ad --labels-key cell_type --batch-key batch"
  "modality_pbmc1k --task modality --data $DATA/pbmc1k_cite.rna.h5ad --paired $DATA/pbmc1k_cite.protein.h5ad --modality protein"
  "modality_eccite --task modality --data $DATA/eccite_pbmc_500.rna.h5ad --paired $DATA/eccite_pbmc_500.protein.h5ad --modality protein --batch-key batch"
)
failed=0
running=0
queue() {  # queue OUTPUT_DIR METHODS SEEDS RUN: start a run, at most JOBS at a time
    local task
    task=$(awk '{for (i = 1; i < NF; i++) if ($i == "--task") print $(i + 1)}' <<< "$4")
    # shellcheck disable=SC2086  # each entry is a name followed by its flags
    bench "$1" "${2:-$(methods "$task")}" "$3" $4 &
    running=$((running + 1))
    if (( running >= JOBS )); then wait -n || failed=1; running=$((running - 1)); fi
}
for run in "${RUNS_LIST[@]}"; do queue "$RUNS" "" "$SEEDS" "$run"; done
if [[ -z "${METHODS:-}" ]]; then
    for run in "${RUNS_LIST[@]}"; do queue "$RUNS/ablations" "$ABLATIONS" "$ABLATION_SEEDS" "$run"; done
fi
while (( running > 0 )); do wait -n || failed=1; running=$((running - 1)); done

# 3. one report over everything
[[ $failed == 0 ]] || echo "some runs failed; the report covers the others"
REPLACE=()
[[ -d "$RUNS/ablations" ]] && REPLACE=(--replace "$RUNS"/ablations/*/)
"$PY" benchmarks/collect_results.py $(ls -d "$RUNS"/*/ | grep -v '/ablations/$') "${REPLACE[@]}" --checkpoint "$MODEL" --output "$REPORT" \
    --budgets "model ${MODEL}; fine-tuning at the defaults (no override); ${BUDGETS[*]}; seeds ${SEEDS} (ablations: ${ABLATION_SEEDS}); scvi_tools $(
        [[ "${REFERENCE:-1}" == "1" ]] && echo included || echo 'left out (REFERENCE=0)')" \
    --conditions "${JOBS} benchmark runs went side by side on the machine's cores, ${THREADS} torch thread(s) each."
