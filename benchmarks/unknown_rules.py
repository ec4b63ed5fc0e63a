"""Which rule calls a cell type the reference lacks "unknown" (docs/mapping.md, "Unknown").

On a labelled file with batches, for each of the 2 largest batches as the query and each named cell type left
out of the reference: the fraction of the left-out type's query cells (novel) and of the other query cells
(known) that each distance rule flags, in the expression representation of ``map_query`` (50 PCs of the
reference's 2,000 HVGs). Thresholds are 99th percentiles of the reference's out-of-fold values, folds = batches.

- global: mean distance to the 15 nearest reference cells, against every reference cell (the shipped rule);
- per_label: the same distance, against reference cells with the cell's predicted label;
- pca_residual: distance from the reference's 50-PC subspace in HVG space (PCA reconstruction error).

    python benchmarks/unknown_rules.py ../shared/data/kang_pbmc_8donors.h5ad cell_type "B cells" "NK cells"
"""

import sys

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

from atlasformer.finetune.baselines import log_normalize, select_hvgs
from atlasformer.finetune.common import read_counts
from atlasformer.finetune.mapping import N_HVGS, N_PCS, neighbour_votes, out_of_fold_votes

QUANTILE, K = 0.99, 15


def pca_residual(pca: PCA, x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x - pca.inverse_transform(pca.transform(x)), axis=1)


def flags(x_ref, x_query, codes, folds, n_labels) -> dict[str, np.ndarray]:
    """Each rule's unknown call for every query cell."""
    pca = PCA(N_PCS, random_state=0).fit(x_ref)
    ref_pcs, query_pcs = pca.transform(x_ref), pca.transform(x_query)
    oof_votes, oof_distance = out_of_fold_votes(ref_pcs, codes, n_labels, folds, K)
    votes, distance = neighbour_votes(ref_pcs, codes, n_labels, query_pcs, K)
    oof_label, label = oof_votes.argmax(1), votes.argmax(1)
    overall = np.quantile(oof_distance, QUANTILE)
    per_label = np.array([np.quantile(oof_distance[oof_label == c], QUANTILE) if (oof_label == c).sum() >= 20
                          else overall for c in range(n_labels)])
    oof_residual = np.zeros(len(x_ref))
    for fold in np.unique(folds):
        held = folds == fold
        oof_residual[held] = pca_residual(PCA(N_PCS, random_state=0).fit(x_ref[~held]), x_ref[held])
    return {"global": distance > overall, "per_label": distance > per_label[label],
            "pca_residual": pca_residual(pca, x_query) > np.quantile(oof_residual, QUANTILE)}


def main() -> None:
    path, labels_key, left_out = sys.argv[1], sys.argv[2], sys.argv[3:]
    adata = ad.read_h5ad(path)
    expression = log_normalize(read_counts(adata, None, path))
    batch = adata.obs["batch"].astype(str).to_numpy()
    labels = adata.obs[labels_key].astype(str).to_numpy()
    for query_batch in pd.Series(batch).value_counts().index[:2]:
        for novel_type in left_out:
            reference, query = (batch != query_batch) & (labels != novel_type), batch == query_batch
            hvgs = select_hvgs(expression[reference], N_HVGS)
            names = np.unique(labels[reference])
            codes = np.searchsorted(names, labels[reference])
            folds = pd.factorize(batch[reference])[0]
            called = flags(expression[reference][:, hvgs].toarray(), expression[query][:, hvgs].toarray(), codes,
                           folds, len(names))
            novel = labels[query] == novel_type
            print(f"query {query_batch}, {novel_type} left out ({novel.sum()} cells): " + "; ".join(
                f"{rule} novel {flag[novel].mean():.2f} known {flag[~novel].mean():.3f}" for rule, flag in called.items()),
                flush=True)


if __name__ == "__main__":
    main()
