#!/usr/bin/env bash
# Rebuild atlasformer-public-small, the model that ships with the package, from its config and seed, and compare
# the result with the shipped weights (identical at the same torch thread count; otherwise the largest
# difference per tensor is printed).
#
#   bash scripts/build_public_model.sh              # pretrain into runs/public-small and compare
#   INSTALL=1 bash scripts/build_public_model.sh    # ... then replace the shipped folder with the rebuilt one
#
# Needs the public human RNA files of ../shared/data (DATA=...). Pretraining takes about 35 minutes on one CPU
# thread (THREADS, default 1, the thread count the shipped model was trained with).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
AF=${AF:-.venv/bin/atlasformer}
DATA=${DATA:-../shared/data}
THREADS=${THREADS:-1}
OUT=${OUT:-runs/public-small}
SHIPPED=checkpoints/pretrained/atlasformer-public-small

# the corpus: every human RNA file of ../shared/data (the mouse files are left out)
CORPUS=()
for name in kang_pbmc_8donors cellbench_lung_lines_5batches pbmc_10x_3chemistries pbmc4k_10x_v2 pbmc_sorted_reference \
            pbmc_donorA_query kang_pbmc_ctrl_stim pbmc_celltypist_sample pbmc1k_cite.rna eccite_pbmc_500.rna; do
    CORPUS+=("$DATA/$name.h5ad")
done
start=$(date +%s)
OMP_NUM_THREADS=$THREADS "$AF" pretrain --data "${CORPUS[@]}" --output "$OUT" --config configs/pretrain/public_small.yaml \
    threads="$THREADS"
seconds=$(( $(date +%s) - start ))
echo "pretraining took $seconds s on $THREADS thread(s)"
"$PY" scripts/compare_weights.py "$OUT/model" "$SHIPPED"
if [[ "${INSTALL:-0}" == "1" ]]; then
    "$PY" scripts/ship_model.py "$OUT" "$SHIPPED" "$seconds" "$THREADS"
fi
