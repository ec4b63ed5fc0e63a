"""Simple baselines a foundation model has to beat, on the features BENCHMARKS.md fixes.

Features: log-normalised counts (``normalize_total(target_sum=1e4)`` then ``log1p``), 2,000 HVGs chosen by
scanpy ``highly_variable_genes(flavor="seurat")`` on the training cells only (all genes if fewer), and 50
principal components fitted on the training cells (:class:`RNAFeatures`). Baselines (scikit-learn and
harmonypy underneath):

- annotation: :func:`logreg` (L2 logistic regression, C=1, on log-normalised HVGs), :func:`knn_classify`
  (k=15, on PCs or any embedding);
- integration: PCs (unintegrated) and :func:`harmony` (harmonypy on the PCs);
- modality prediction: :func:`mean_predictor`, :func:`ridge` (RidgeCV, alphas 0.1 ... 1000), :func:`knn_regress`;
- imputation: :func:`no_denoising` (row-normalised counts) and :func:`knn_smoothing` (mean over 15 neighbours
  in PC space, self included).
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor, NearestNeighbors

from .metrics import row_normalised

RIDGE_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)


def log_normalize(counts) -> sp.csr_matrix:
    """``normalize_total(target_sum=1e4)`` then ``log1p`` (scanpy), on a copy; (cells, genes) CSR."""
    import scanpy as sc

    adata = ad.AnnData(sp.csr_matrix(counts, dtype=np.float32, copy=True))
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata.X


def select_hvgs(log_counts_train, n_top: int = 2000) -> np.ndarray:
    """Column indices of the ``n_top`` HVGs of log-normalised training cells (seurat flavour); all if fewer."""
    import scanpy as sc

    n_genes = log_counts_train.shape[1]
    if n_genes <= n_top:
        return np.arange(n_genes)
    adata = ad.AnnData(sp.csr_matrix(log_counts_train))
    sc.pp.highly_variable_genes(adata, n_top_genes=n_top, flavor="seurat")
    return np.flatnonzero(adata.var["highly_variable"].to_numpy())


@dataclass
class RNAFeatures:
    """HVGs and PCA fitted on training cells; applies the same transform to any cells.

    Examples
    --------
    >>> features = RNAFeatures.fit(counts[train], seed=0)
    >>> pcs_train, pcs_test = features.pcs(counts[train]), features.pcs(counts[test])
    """

    hvgs: np.ndarray
    """Column indices of the HVGs."""
    pca: PCA
    """PCA fitted on the training cells' log-normalised HVGs."""

    @classmethod
    def fit(cls, counts_train, *, n_hvgs: int = 2000, n_pcs: int = 50, seed: int = 0) -> RNAFeatures:
        log_counts = log_normalize(counts_train)
        hvgs = select_hvgs(log_counts, n_hvgs)
        x = log_counts[:, hvgs].toarray()
        n_components = max(1, min(n_pcs, x.shape[0] - 1, x.shape[1]))
        return cls(hvgs=hvgs, pca=PCA(n_components=n_components, random_state=seed).fit(x))

    def hvg_matrix(self, counts) -> np.ndarray:
        """(cells, HVGs) dense log-normalised expression."""
        return log_normalize(counts)[:, self.hvgs].toarray()

    def pcs(self, counts) -> np.ndarray:
        """(cells, n_pcs) principal components."""
        return self.pca.transform(self.hvg_matrix(counts)).astype(np.float32)


# ------------------------------------------------------------------ annotation
def logreg(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Labels predicted by L2 logistic regression (C=1) trained on ``x_train`` (log-normalised HVGs)."""
    model = LogisticRegression(C=1.0, max_iter=1000, random_state=seed)
    return model.fit(x_train, np.asarray(y_train).astype(str)).predict(x_test)


def knn_classify(emb_train: np.ndarray, y_train: np.ndarray, emb_test: np.ndarray, *, k: int = 15) -> np.ndarray:
    """Majority label of the ``k`` nearest training cells (Euclidean) in an embedding."""
    model = KNeighborsClassifier(n_neighbors=min(k, len(emb_train)))
    return model.fit(emb_train, np.asarray(y_train).astype(str)).predict(emb_test)


# ------------------------------------------------------------------ integration
def harmony(pcs: np.ndarray, batch: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Harmony-corrected PCs (cells, n_pcs) with ``batch`` as the covariate (harmonypy)."""
    import harmonypy
    import pandas as pd

    meta = pd.DataFrame({"batch": np.asarray(batch).astype(str)})
    result = harmonypy.run_harmony(np.asarray(pcs, dtype=np.float64), meta, ["batch"], random_state=seed, verbose=False)
    corrected = np.asarray(result.Z_corr)
    # harmonypy returns (dims, cells) in older releases and (cells, dims) in newer ones
    return (corrected.T if corrected.shape[0] != len(meta) else corrected).astype(np.float32)


# ------------------------------------------------------------------ modality prediction
def mean_predictor(y_train: np.ndarray, n_test: int) -> np.ndarray:
    """The training mean of every target feature, for each of ``n_test`` cells."""
    return np.repeat(np.asarray(y_train, dtype=np.float64).mean(0, keepdims=True), n_test, axis=0)


def ridge(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Multi-output ridge regression with alpha chosen by efficient leave-one-out CV over 0.1 ... 1000."""
    return RidgeCV(alphas=RIDGE_ALPHAS).fit(x_train, np.asarray(y_train, dtype=np.float64)).predict(x_test)


def knn_regress(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, *, k: int = 15) -> np.ndarray:
    """Mean target of the ``k`` nearest training cells."""
    model = KNeighborsRegressor(n_neighbors=min(k, len(x_train)))
    return model.fit(x_train, np.asarray(y_train, dtype=np.float64)).predict(x_test)


# ------------------------------------------------------------------ imputation
def no_denoising(x_train) -> np.ndarray:
    """Expression proportions (cells, genes): each cell's training counts over its total."""
    return row_normalised(x_train)


def knn_smoothing(x_train, embedding: np.ndarray, *, k: int = 15) -> np.ndarray:
    """Proportions averaged over each cell's ``k`` nearest neighbours in ``embedding`` (self included)."""
    proportions = sp.csr_matrix(no_denoising(x_train))
    k = min(k, embedding.shape[0])
    neighbours = NearestNeighbors(n_neighbors=k).fit(embedding).kneighbors(embedding, return_distance=False)
    cells = np.arange(len(neighbours))
    # a cell is its own nearest neighbour unless it has exact duplicates; then put it in place of the farthest
    missing_self = ~(neighbours == cells[:, None]).any(1)
    neighbours[missing_self, -1] = cells[missing_self]
    rows = np.repeat(cells, k)
    averaging = sp.csr_matrix((np.full(rows.size, 1.0 / k, dtype=np.float32), (rows, neighbours.ravel())),
                              shape=(len(neighbours), len(neighbours)))
    return np.asarray((averaging @ proportions).todense(), dtype=np.float32)
