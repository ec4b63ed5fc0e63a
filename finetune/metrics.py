"""Metrics shared by tasks and benchmarks (scikit-learn underneath); the plots are in plots.py."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, f1_score

from .plots import plot_confusion_matrix  # noqa: F401  (drawn in plots.py; imported from here by the tasks)


def classification_metrics(true: np.ndarray, pred: np.ndarray) -> dict:
    """Accuracy, macro-F1 over the labels present in ``true``, and per-class precision / recall / F1."""
    true, pred = np.asarray(true).astype(str), np.asarray(pred).astype(str)
    labels = sorted(set(true))
    report = classification_report(true, pred, labels=labels, output_dict=True, zero_division=0)
    return {
        "accuracy": float(accuracy_score(true, pred)),
        "macro_f1": float(f1_score(true, pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {str(lab): {k: float(report[lab][k]) for k in ("precision", "recall", "f1-score", "support")} for lab in labels},
    }


# ------------------------------------------------------------------ imputation: molecular cross-validation
def binomial_thinning(counts, p: float = 0.9, seed: int = 0):
    """Split counts into ``x_train ~ Binomial(x, p)`` and ``x_test = x - x_train`` (BENCHMARKS.md, MCV).

    ``counts`` is a (cells, genes) scipy sparse or dense matrix of integer counts; returns two CSR matrices.
    """
    import scipy.sparse as sp

    x = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    x.sum_duplicates()
    rng = np.random.default_rng([seed, 0x4D4356])  # "MCV"
    train_data = rng.binomial(np.rint(x.data).astype(np.int64), p).astype(np.float32)
    x_train = sp.csr_matrix((train_data, x.indices.copy(), x.indptr.copy()), shape=x.shape)
    x_test = sp.csr_matrix((x.data - train_data, x.indices.copy(), x.indptr.copy()), shape=x.shape)
    x_train.eliminate_zeros()
    x_test.eliminate_zeros()
    return x_train, x_test


def _dense_rows(matrix, lo: int, hi: int) -> np.ndarray:
    import scipy.sparse as sp

    block = matrix[lo:hi]
    return (block.toarray() if sp.issparse(block) else np.asarray(block)).astype(np.float64)


def mcv_poisson_nll(proportions, x_test, *, floor: float = 1e-8, chunk: int = 512) -> float:
    """Mean Poisson negative log-likelihood per test count of ``x_test`` under ``proportions`` (cells, genes).

    Predicted rates are the proportions times each cell's total test count, floored at ``floor``. The
    sum of ``rate - x log(rate) + lgamma(x + 1)`` over all entries is divided by the number of test counts.
    """
    from scipy.special import gammaln

    total_nll, total_counts = 0.0, 0.0
    for lo in range(0, x_test.shape[0], chunk):
        x = _dense_rows(x_test, lo, lo + chunk)
        props = _dense_rows(proportions, lo, lo + chunk)
        props /= np.maximum(props.sum(1, keepdims=True), 1e-12)
        rate = np.maximum(props * x.sum(1, keepdims=True), floor)
        total_nll += float((rate - x * np.log(rate) + gammaln(x + 1)).sum())
        total_counts += float(x.sum())
    return total_nll / max(total_counts, 1.0)


def mcv_pearson_log1p(proportions, x_test, x_train, *, n_top: int = 2000, chunk: int = 512) -> float:
    """Pearson r between log1p(predicted) and log1p(x_test) over the ``n_top`` genes with most x_train counts."""
    gene_totals = np.asarray(x_train.sum(0)).ravel()
    top = np.sort(np.argsort(-gene_totals, kind="stable")[: min(n_top, len(gene_totals))])
    pred_parts, true_parts = [], []
    for lo in range(0, x_test.shape[0], chunk):
        x = _dense_rows(x_test, lo, lo + chunk)
        props = _dense_rows(proportions, lo, lo + chunk)
        props /= np.maximum(props.sum(1, keepdims=True), 1e-12)
        pred_parts.append(np.log1p(props[:, top] * x.sum(1, keepdims=True)).ravel())
        true_parts.append(np.log1p(x[:, top]).ravel())
    pred, true = np.concatenate(pred_parts), np.concatenate(true_parts)
    if pred.std() == 0 or true.std() == 0:
        return 0.0
    return float(np.corrcoef(pred, true)[0, 1])


def row_normalised(counts) -> np.ndarray:
    """The ``no_denoising`` baseline: each cell's counts divided by its total (dense float32)."""
    x = _dense_rows(counts, 0, counts.shape[0])
    return (x / np.maximum(x.sum(1, keepdims=True), 1.0)).astype(np.float32)


def imputation_metrics(proportions, x_test, x_train, *, n_top: int = 2000) -> dict:
    """``poisson_nll`` and ``pearson_log1p`` of BENCHMARKS.md section 3."""
    return {"poisson_nll": mcv_poisson_nll(proportions, x_test),
            "pearson_log1p": mcv_pearson_log1p(proportions, x_test, x_train, n_top=n_top)}


# ------------------------------------------------------------------ modality prediction
def clr(counts) -> np.ndarray:
    """Per-cell centred log-ratio of protein counts: ``log1p(x) - mean over proteins of log1p(x)``."""
    x = np.log1p(_dense_rows(counts, 0, counts.shape[0]))
    return (x - x.mean(1, keepdims=True)).astype(np.float32)


def _mean_pearson(a: np.ndarray, b: np.ndarray, axis: int) -> float:
    """Mean Pearson r along ``axis`` pairs (columns for axis=0, rows for axis=1), skipping constant ones."""
    a = a - a.mean(axis, keepdims=True)
    b = b - b.mean(axis, keepdims=True)
    denom = np.sqrt((a**2).sum(axis) * (b**2).sum(axis))
    ok = denom > 0
    return float(((a * b).sum(axis)[ok] / denom[ok]).mean()) if ok.any() else 0.0


def protein_metrics(true: np.ndarray, pred: np.ndarray) -> dict:
    """``rmse`` over all entries, mean ``pearson_per_feature`` (across cells), mean ``pearson_per_cell``."""
    true, pred = np.asarray(true, np.float64), np.asarray(pred, np.float64)
    return {"rmse": float(np.sqrt(((true - pred) ** 2).mean())),
            "pearson_per_feature": _mean_pearson(true, pred, 0),
            "pearson_per_cell": _mean_pearson(true, pred, 1)}


def atac_metrics(true: np.ndarray, prob: np.ndarray) -> dict:
    """``auroc`` over all entries and mean ``auroc_per_feature`` over peaks with both classes in ``true``."""
    from sklearn.metrics import roc_auc_score

    true = np.asarray(true) > 0
    prob = np.asarray(prob, np.float64)
    both = true.any(0) & ~true.all(0)
    per_peak = [roc_auc_score(true[:, j], prob[:, j]) for j in np.flatnonzero(both)]
    overall = roc_auc_score(true.ravel(), prob.ravel()) if true.any() and not true.all() else float("nan")
    return {"auroc": float(overall), "auroc_per_feature": float(np.mean(per_peak)) if per_peak else float("nan"),
            "n_features_scored": int(both.sum())}


# ------------------------------------------------------------------ integration (scib-metrics)
def scib_scores(embeddings: dict[str, np.ndarray], batch, labels, *, pre_integrated: np.ndarray | None = None,
                disable: tuple[str, ...] = (), n_jobs: int = 1) -> dict:
    """scib-metrics ``Benchmarker`` scores of each embedding (BENCHMARKS.md section 2).

    Parameters
    ----------
    embeddings
        Name -> (cells, dims) embedding.
    batch, labels
        Per-cell batch and cell-type labels (labels are used for scoring only).
    pre_integrated
        The unintegrated embedding for ``pcr_comparison`` (default: the Benchmarker's PCA of the first
        embedding, which is not meaningful; pass PCs of the expression).
    disable
        Metric names to switch off (e.g. those that cannot run on small data); reported under ``disabled``.

    Returns
    -------
    ``{"methods": {name: {"bio_conservation", "batch_correction", "total", <metric>: value}}, "disabled": [...]}``
    with aggregates from ``get_results(min_max_scale=False)``.
    """
    import anndata as ad
    import pandas as pd
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    names = list(embeddings)
    obs = pd.DataFrame({"batch": pd.Categorical(np.asarray(batch).astype(str)),
                        "labels": pd.Categorical(np.asarray(labels).astype(str))})
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(obs=obs)
    for name in names:
        adata.obsm[name] = np.asarray(embeddings[name], dtype=np.float32)
    # without an unintegrated embedding the Benchmarker would run PCA on an empty X: use the first embedding
    pre = embeddings[names[0]] if pre_integrated is None else pre_integrated
    adata.obsm["X_pre_integrated"] = np.asarray(pre, dtype=np.float32)
    pre_key = "X_pre_integrated"
    bio_fields = set(BioConservation.__dataclass_fields__)
    bio = BioConservation(**{k: False for k in disable if k in bio_fields})
    batch_corr = BatchCorrection(**{k: False for k in disable if k not in bio_fields})
    bench = Benchmarker(adata, batch_key="batch", label_key="labels", embedding_obsm_keys=names,
                        bio_conservation_metrics=bio, batch_correction_metrics=batch_corr,
                        pre_integrated_embedding_obsm_key=pre_key, n_jobs=n_jobs, progress_bar=False)
    # exact neighbours from scikit-learn: pynndescent's numba compilation costs a minute per process
    bench.prepare(neighbor_computer=exact_neighbors if adata.n_obs <= 50_000 else None)
    bench.benchmark()
    table = bench.get_results(min_max_scale=False, clean_names=False)
    table = table.drop(index="Metric Type")
    aggregates = {"Bio conservation": "bio_conservation", "Batch correction": "batch_correction", "Total": "total"}
    methods = {}
    for name in names:
        row = table.loc[name]
        methods[name] = {aggregates.get(col, col): float(row[col]) for col in table.columns}
    return {"methods": methods, "disabled": sorted(disable)}


def exact_neighbors(x: np.ndarray, k: int):
    """scib-metrics ``NeighborsResults`` from scikit-learn's exact k-nearest neighbours (self included)."""
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    distances, indices = NearestNeighbors(n_neighbors=min(k, len(x))).fit(x).kneighbors(x)
    return NeighborsResults(indices=indices, distances=distances)


def batch_mixing_entropy(embedding: np.ndarray, batch, k: int = 15) -> float:
    """Mean entropy of the batch labels among each cell's k nearest neighbours, over log(n batches): 1 = mixed."""
    from sklearn.neighbors import NearestNeighbors

    codes = np.unique(np.asarray(batch).astype(str), return_inverse=True)[1]
    n_batches = codes.max() + 1
    if n_batches < 2 or len(codes) < 2:
        return 0.0
    indices = NearestNeighbors(n_neighbors=min(k + 1, len(codes))).fit(embedding).kneighbors(embedding)[1][:, 1:]
    counts = np.stack([(codes[indices] == b).sum(1) for b in range(n_batches)], 1) / indices.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(counts > 0, counts * np.log(counts), 0.0).sum(1)
    return float(entropy.mean() / np.log(n_batches))


# ------------------------------------------------------------------ mapping a query onto a reference
def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> float:
    """ECE of ``confidence`` for ``correct`` (BENCHMARKS.md section 5): cells binned by confidence into
    ``n_bins`` equal-width bins over [0, 1] (the last bin holds 1.0), the mean over bins of
    ``|accuracy - mean confidence|`` weighted by each bin's share of the cells. NaN for no cells."""
    confidence = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    correct = np.asarray(correct, dtype=np.float64)
    if len(confidence) == 0:
        return float("nan")
    bins = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    cells = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, correct, n_bins) - np.bincount(bins, confidence, n_bins))  # summed per bin
    return float(gap.sum() / cells.sum())


def error_auroc(uncertainty: np.ndarray, correct: np.ndarray) -> float:
    """AUROC of ``uncertainty`` for telling misclassified cells (positives) from correct ones; NaN when only
    one kind is present."""
    from sklearn.metrics import roc_auc_score

    wrong = ~np.asarray(correct, dtype=bool)
    if wrong.all() or not wrong.any():
        return float("nan")
    return float(roc_auc_score(wrong, np.asarray(uncertainty, dtype=np.float64)))


def query_ilisi(joint_embedding: np.ndarray, is_query: np.ndarray, n_neighbors: int = 90) -> float:
    """scib-metrics iLISI (scaled to [0, 1], higher is more mixed) of reference and query cells on their joint
    embedding, with reference / query as the batch; ``n_neighbors`` as scib's Benchmarker (90), exact."""
    is_query = np.asarray(is_query, dtype=bool)
    if is_query.all() or not is_query.any():
        return float("nan")
    from scib_metrics import ilisi_knn  # jax underneath: imported only when there is something to score

    x = np.asarray(joint_embedding, dtype=np.float32)
    neighbours = exact_neighbors(x, min(n_neighbors, len(x) - 1))
    return float(ilisi_knn(neighbours, np.where(is_query, "query", "reference")))


def mapping_metrics(true_labels, predicted, confidence, joint_embedding: np.ndarray, is_query) -> dict:
    """The mapping metrics of BENCHMARKS.md section 5 for the query cells.

    Parameters
    ----------
    true_labels, predicted, confidence
        Per query cell: its true label, the transferred label (the best-supported reference label, also where
        the call is "unknown") and the reported confidence in it, in [0, 1].
    joint_embedding
        (reference + query cells, dims) the embedding the query was placed in.
    is_query
        (reference + query cells,) True for the query's rows of ``joint_embedding``.

    Returns
    -------
    dict
        ``accuracy``, ``macro_f1`` (over the labels present in ``true_labels``), ``ece`` (10 equal-width bins),
        ``auroc_error`` (AUROC of ``1 - confidence`` for misclassified cells) and ``ilisi_query``.
    """
    true_labels, predicted = np.asarray(true_labels).astype(str), np.asarray(predicted).astype(str)
    confidence = np.asarray(confidence, dtype=np.float64)
    if not len(true_labels) == len(predicted) == len(confidence) == int(np.sum(is_query)):
        raise ValueError(f"mapping_metrics: {len(true_labels)} true labels, {len(predicted)} predictions and "
                         f"{len(confidence)} confidences for {int(np.sum(is_query))} query rows of the embedding; "
                         "pass one of each per query cell.")
    correct = true_labels == predicted
    scores = classification_metrics(true_labels, predicted)
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"],
            "ece": expected_calibration_error(confidence, correct),
            "auroc_error": error_auroc(1.0 - confidence, correct),
            "ilisi_query": query_ilisi(joint_embedding, is_query)}
