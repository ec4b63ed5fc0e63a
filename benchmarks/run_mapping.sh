#!/usr/bin/env bash
# The mapping benchmark (docs/benchmarks.md, BENCHMARKS.md section 5): each of the 3 largest batches of kang,
# cellbench and baron held out in turn as the query, plus pbmc_sorted_reference -> pbmc_donorA_query (no query
# labels: predicted composition and unknown fraction), every mapping method, with the shipped model and the
# defaults. Results are collected into benchmarks/results/mapping.md + mapping.json.
#
#   bash benchmarks/run_mapping.sh             # seeds 0 1 2
#   SEEDS="0" bash benchmarks/run_mapping.sh   # one seed
#
# Environment: DATA (default ../shared/data), MODEL, SEEDS, THREADS (default 1), JOBS (runs side by side,
# default 2), ONLY (a regex of run names), RUNS (default benchmarks/results/mapping_runs).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
AF=${AF:-.venv/bin/atlasformer}
DATA=${DATA:-../shared/data}
MODEL=${MODEL:-atlasformer-public-small}
SEEDS=${SEEDS:-"0 1 2"}
THREADS=${THREADS:-1}
JOBS=${JOBS:-2}
RUNS=${RUNS:-benchmarks/results/mapping_runs}
export OMP_NUM_THREADS=$THREADS NUMBA_NUM_THREADS=$THREADS
BUDGETS=(scvi_epochs=${SCVI_EPOCHS:-50} threads=$THREADS)

RUNS_LIST=(
  "mapping_kang --data $DATA/kang_pbmc_8donors.h5ad --labels-key cell_type --batch-key batch"
  "mapping_baron --data $DATA/baron_mouse_pancreas.h5ad --labels-key cell_type --batch-key batch"
  "mapping_cellbench --data $DATA/cellbench_lung_lines_5batches.h5ad --labels-key cell_line --batch-key batch"
  "mapping_pbmc_query --data $DATA/pbmc_sorted_reference.h5ad --query $DATA/pbmc_donorA_query.h5ad --labels-key cell_type --batch-key batch"
)
bench() {  # bench NAME FLAGS...
    local name=$1; shift
    if [[ -n "${ONLY:-}" && ! "$name" =~ ${ONLY} ]]; then echo "$name: not selected (ONLY=$ONLY)"; return; fi
    local start; start=$(date +%s)
    rm -rf "${RUNS:?}/$name" && mkdir -p "$RUNS/$name"  # this script owns its run folders
    # shellcheck disable=SC2086  # the seeds are words
    "$AF" benchmark --task mapping "$@" --model "$MODEL" --seeds $SEEDS --output "$RUNS/$name" --overwrite \
        "${BUDGETS[@]}" > "$RUNS/$name/log.txt" 2>&1 \
        || { echo "$name: FAILED after $(( $(date +%s) - start )) s (see $RUNS/$name/log.txt)"; return 1; }
    echo "$name: $(( $(date +%s) - start )) s"
}
failed=0
running=0
for run in "${RUNS_LIST[@]}"; do
    # shellcheck disable=SC2086  # each entry is a name followed by its flags
    bench $run &
    running=$((running + 1))
    if (( running >= JOBS )); then wait -n || failed=1; running=$((running - 1)); fi
done
while (( running > 0 )); do wait -n || failed=1; running=$((running - 1)); done
[[ $failed == 0 ]] || echo "some runs failed; the report covers the others"
"$PY" benchmarks/collect_results.py $(ls -d "$RUNS"/*/) --checkpoint "$MODEL" --output benchmarks/results/mapping \
    --title "atlasformer mapping benchmark" \
    --budgets "model ${MODEL}; mapping at the defaults (no override); ${BUDGETS[*]}; seeds ${SEEDS}" \
    --conditions "${JOBS} benchmark runs went side by side on the machine's cores, ${THREADS} torch thread(s) each."
