"""Mapping a query onto a labelled reference: weighted kNN label transfer with a calibrated uncertainty and an
``"unknown"`` call, the query placed on the reference's fixed UMAP, and :func:`map_query`, which builds the
representation from the data (and a model) and does both.

Label transfer (:func:`transfer_labels`) follows scArches' weighted kNN: each query cell's ``n_neighbors`` nearest
reference cells vote for their labels with Gaussian-kernel weights of their distances. The highest vote share is
a raw confidence, not the probability of being right (too high or too low, by representation and k); it is
calibrated on the reference alone by cross-fitting: every reference cell is classified by the reference cells of
the other folds (its other batches with ``batch_key``, else 5 random folds), and an isotonic regression of "the
vote was right" on the raw confidence maps raw to calibrated confidence. A query cell is called ``"unknown"``
when its mean distance to its neighbours exceeds the 99th percentile of the same distance for reference cells
among the other folds (no reference label is close), or when its calibrated confidence is below 0.5 (its vote is
more likely wrong than right). A cell type unlike every reference type is caught, one beside a known type mostly
not: on kang (default representation) with B cells left out of the reference, 60% of the query's B cells are
called unknown (the distance rule alone: 6%); with NK cells left out (they sit beside CD8 T cells), 2%.

Which representation the kNN uses by default was measured on ``kang_pbmc_8donors`` (reference: the other donors;
query: each of the 3 largest donors in turn; mean accuracy / macro-F1; k=15): PCs of log-normalised HVGs
0.940 / 0.782, the shipped model's zero-shot embedding 0.747 / 0.483, both side by side (each scaled to unit total
variance) 0.931 / 0.765, both with the embedding block down-weighted to 0.1 (the integration recipe's
``embedding_weight``) 0.938 / 0.780, and Harmony over the joint reference + query PCs did not help (0.927 / 0.766).
With a model, the default is ``"joint"`` at weight 0.1 (the expression PCs carry the labels, the embedding adds
what the model knows at almost no cost: 0.002 accuracy on kang); without one, ``"expression"``. Logistic
regression on the HVGs reaches 0.944 / 0.812 on the same folds.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.isotonic import IsotonicRegression
from sklearn.neighbors import NearestNeighbors

from atlasformer.checkpoints import load_model_folder, resolve_model
from atlasformer.tokenization import CellTokenizer, InputError
from atlasformer.tokenization.anndata_io import check_obs_key

from .annotation import UNKNOWN
from .baselines import log_normalize, select_hvgs
from .common import (
    RANDOM_FOLDS,
    FinetunedTask,
    annotation_snapshot,
    changed_keys,
    cross_fitting_folds,
    gene_report,
    iter_model_outputs,
    output_adata,
    read_counts,
    record_provenance,
    to_inference_device,
)
from .config import FinetuneConfig
from .expression import path_gene_columns
from .metrics import expected_calibration_error

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

Representation = Literal["expression", "embedding", "joint"]
"""What the kNN compares: PCs of log-normalised HVGs of the genes reference and query share (``"expression"``,
the default without a model), the model's cell embedding (``"embedding"``), or both side by side, each scaled to
unit total variance on the reference and the embedding then weighted by ``embedding_weight`` (``"joint"``, the
default with a model)."""

EMBEDDING_WEIGHT = 0.1
"""Weight of the embedding block in ``"joint"`` (the integration recipe's ``embedding_weight``; kang above)."""

CONFIDENCE_THRESHOLD = 0.5
"""Calibrated confidence below which a query cell is called unknown: its vote is more likely wrong than right."""
DISTANCE_QUANTILE = 0.99
"""Quantile of the reference's out-of-fold neighbour distances beyond which a query cell is called unknown."""
MIN_SHARED_GENES = 200
"""Fewest genes reference and query must share for the expression representation."""
N_HVGS, N_PCS = 2000, 50
"""The expression representation: HVGs of the reference (seurat flavour) and PCs fitted on the reference."""


# ------------------------------------------------------------------ weighted kNN votes
def kernel_weights(distances: np.ndarray) -> np.ndarray:
    """(cells, k) Gaussian-kernel weights of the distances to each cell's ``k`` nearest reference cells, summing to
    1 per cell; the bandwidth is the cell's distance to its ``k``-th neighbour, so the weights do not depend on the
    representation's scale (scArches scales by the spread of the distances instead)."""
    bandwidth = distances[:, -1:] + 1e-12  # (cells, 1)
    weights = np.exp(-((distances / bandwidth) ** 2))
    return weights / weights.sum(1, keepdims=True)


def neighbour_votes(reference_rep: np.ndarray, reference_codes: np.ndarray, n_labels: int, rep: np.ndarray,
                    n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Each cell of ``rep``'s weighted vote over the labels of its nearest reference cells.

    Returns ``(probabilities (cells, n_labels), mean distance to the neighbours (cells,))``.
    """
    k = min(n_neighbors, len(reference_rep))
    distances, neighbours = NearestNeighbors(n_neighbors=k).fit(reference_rep).kneighbors(rep)  # (cells, k) each
    probabilities = np.zeros((len(rep), n_labels))
    np.add.at(probabilities, (np.repeat(np.arange(len(rep)), k), reference_codes[neighbours].ravel()),
              kernel_weights(distances).ravel())
    return probabilities, distances.mean(1)


def reference_folds(obs: pd.DataFrame, batch_key: str | None, seed: int = 0) -> tuple[np.ndarray, str]:
    """Fold of each reference cell for cross-fitting, and how the folds were made (:func:`cross_fitting_folds`
    over ``obs[batch_key]``); a warning when the column holds one batch."""
    batches = None if batch_key is None else obs[batch_key].astype(str).to_numpy()
    folds, kind = cross_fitting_folds(batches, len(obs), seed)
    if batches is not None and "random" in kind:
        logger.warning(f"reference obs[{batch_key!r}] holds one batch: the calibration uses {RANDOM_FOLDS} random "
                       "folds, which do not show it how a new batch differs, so query confidences may be too high.")
    return folds, kind if batches is None or "random" in kind else f"{kind} in obs[{batch_key!r}]"


def out_of_fold_votes(rep: np.ndarray, codes: np.ndarray, n_labels: int, folds: np.ndarray, n_neighbors: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Every reference cell's vote (probabilities, mean neighbour distance) among the cells of the other folds."""
    probabilities, distances = np.zeros((len(rep), n_labels)), np.zeros(len(rep))
    for fold in np.unique(folds):
        held = folds == fold
        probabilities[held], distances[held] = neighbour_votes(rep[~held], codes[~held], n_labels, rep[held],
                                                               n_neighbors)
    return probabilities, distances


def fit_calibration(raw_confidence: np.ndarray, correct: np.ndarray) -> IsotonicRegression:
    """Isotonic regression of correctness on the raw vote confidence: calibrated confidence, monotone in raw."""
    return IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(raw_confidence, correct.astype(float))


def cross_fitted_confidence(raw_confidence: np.ndarray, correct: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each reference cell's calibrated confidence from a calibration fitted on the other folds only, so the
    calibrated ECE reported is measured on cells the calibration did not see."""
    calibrated = np.zeros(len(raw_confidence))
    for fold in np.unique(folds):
        held = folds == fold
        if (~held).any():
            calibrated[held] = fit_calibration(raw_confidence[~held], correct[~held]).predict(raw_confidence[held])
    return calibrated


# ------------------------------------------------------------------ label transfer
def reference_labels(reference: ad.AnnData, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(labelled cell mask, label names)`` of ``reference.obs[labels_key]`` (NaN / empty are unlabelled)."""
    check_obs_key(reference.obs, labels_key, source="reference")
    labels = reference.obs[labels_key]
    labelled = labels.notna().to_numpy() & ~labels.astype(str).isin(["nan", ""]).to_numpy()
    names = np.asarray(sorted(labels[labelled].astype(str).unique()), dtype=object)
    if len(names) < 2:
        raise InputError(f"reference obs[{labels_key!r}] has {len(names)} distinct label(s); label transfer needs "
                         "at least 2.")
    if UNKNOWN in set(names):
        raise InputError(f"reference obs[{labels_key!r}] has cells labelled {UNKNOWN!r}, the label transfer's own "
                         "call for cells no reference label is close to; rename that label or leave those cells "
                         "unlabelled (NaN).")
    return labelled, names


def representation_of(adata: ad.AnnData, use_rep: str, what: str) -> np.ndarray:
    """``adata.obsm[use_rep]`` as a float32 array, or an error naming how to make it."""
    if use_rep not in adata.obsm:
        raise InputError(f"{what} has no obsm[{use_rep!r}] (it has {sorted(adata.obsm)}); compute the same "
                         "representation for reference and query first (atlasformer.embed, or map_query, which "
                         "builds it), or name another with use_rep=.")
    return np.asarray(adata.obsm[use_rep], dtype=np.float32)


def transfer_labels(query: ad.AnnData, reference: ad.AnnData, *, labels_key: str, use_rep: str = "X_atlasformer",
                    batch_key: str | None = None, n_neighbors: int = 15,
                    unknown_confidence: float = CONFIDENCE_THRESHOLD,
                    unknown_distance_quantile: float | None = DISTANCE_QUANTILE, key_added: str = "atlasformer",
                    seed: int = 0, copy: bool = False) -> ad.AnnData | None:
    """Transfer ``reference.obs[labels_key]`` to ``query`` by weighted kNN in ``obsm[use_rep]``, with a calibrated
    uncertainty and an ``"unknown"`` call (the module docstring says how both are made).

    Parameters
    ----------
    query, reference
        Cells with the same representation in ``obsm[use_rep]``; the reference's labels in ``obs[labels_key]``
        (NaN cells are left out).
    labels_key
        The reference's label column.
    use_rep
        The representation both hold.
    batch_key
        The reference's batch column: its batches are the calibration's folds (recommended: a query from a new
        batch is what they imitate). Without it, 5 random folds.
    n_neighbors
        Reference cells that vote for each query cell.
    unknown_confidence
        Calibrated confidence below which a cell is called ``"unknown"`` (0 turns this rule off).
    unknown_distance_quantile
        Quantile of the reference's out-of-fold mean neighbour distances beyond which a cell is called
        ``"unknown"`` (None turns this rule off).
    key_added
        Prefix of the keys written.
    seed
        Seed of the random folds.
    copy
        Return an annotated copy of ``query`` instead of writing into it.

    Returns
    -------
    The annotated copy with ``copy=True``, else None. Writes into the query:

    - ``obs['<key_added>_label']``: the transferred label, ``"unknown"`` where the rules above say so;
    - ``obs['<key_added>_label_argmax']``: the best-supported reference label, also for unknown cells (what
      accuracy is scored on);
    - ``obs['<key_added>_confidence']``: calibrated confidence in the argmax label, and
      ``obs['<key_added>_uncertainty']`` = 1 - confidence, in [0, 1];
    - ``obs['<key_added>_neighbour_distance']``: mean distance to the ``n_neighbors`` nearest reference cells;
    - ``obsm['<key_added>_label_probabilities']``: (cells, labels) the kernel-weighted vote shares (not
      calibrated), columns named by ``uns['<key_added>_label_probabilities_names']``;
    - ``uns['<key_added>_mapping']``: the settings, thresholds and calibration figures: the reference's
      out-of-fold accuracy, ``reference_ece_raw`` and ``reference_ece_calibrated`` (calibration cross-fitted, so
      measured on folds it did not see), and how many query cells were called unknown by each rule.
    """
    labelled, names = reference_labels(reference, labels_key)
    check_obs_key(reference.obs, batch_key, source="reference", what="batch_key")
    if n_neighbors < 1:
        raise InputError(f"n_neighbors={n_neighbors}: at least 1 reference cell must vote.")
    if not 0.0 <= unknown_confidence <= 1.0 or not (unknown_distance_quantile is None
                                                    or 0.0 < unknown_distance_quantile <= 1.0):
        raise InputError(f"unknown_confidence={unknown_confidence} must be in [0, 1] and unknown_distance_quantile="
                         f"{unknown_distance_quantile} in (0, 1] (or None to turn the distance rule off).")
    reference_rep = representation_of(reference, use_rep, "the reference")[labelled]  # (labelled cells, dims)
    rep = representation_of(query, use_rep, "the query")  # (query cells, dims)
    if rep.shape[1] != reference_rep.shape[1]:
        raise InputError(f"obsm[{use_rep!r}] has {rep.shape[1]} dimensions in the query and {reference_rep.shape[1]} "
                         "in the reference; compute both with the same model and settings.")
    codes = np.searchsorted(names, reference.obs[labels_key].astype(str).to_numpy()[labelled])
    folds, fold_kind = reference_folds(reference.obs[labelled], batch_key, seed)

    oof_probabilities, oof_distances = out_of_fold_votes(reference_rep, codes, len(names), folds, n_neighbors)
    oof_raw, oof_correct = oof_probabilities.max(1), oof_probabilities.argmax(1) == codes
    calibration = fit_calibration(oof_raw, oof_correct)
    probabilities, distances = neighbour_votes(reference_rep, codes, len(names), rep, n_neighbors)
    confidence = calibration.predict(probabilities.max(1))
    argmax = names[probabilities.argmax(1)]

    unsure = confidence < unknown_confidence
    distance_threshold = (float(np.quantile(oof_distances, unknown_distance_quantile))
                          if unknown_distance_quantile is not None else float("inf"))
    far = distances > distance_threshold
    label = np.where(unsure | far, UNKNOWN, argmax)

    target = query.copy() if copy else query
    target.obs[f"{key_added}_label"] = pd.Categorical(label, categories=[*names, UNKNOWN])
    target.obs[f"{key_added}_label_argmax"] = pd.Categorical(argmax, categories=list(names))
    target.obs[f"{key_added}_confidence"] = confidence.astype(np.float32)
    target.obs[f"{key_added}_uncertainty"] = (1.0 - confidence).astype(np.float32)
    target.obs[f"{key_added}_neighbour_distance"] = distances.astype(np.float32)
    target.obsm[f"{key_added}_label_probabilities"] = probabilities.astype(np.float32)
    target.uns[f"{key_added}_label_probabilities_names"] = np.asarray(names, dtype=str)
    target.uns[f"{key_added}_mapping"] = {
        "labels_key": labels_key, "use_rep": use_rep, "n_neighbors": int(n_neighbors), "folds": fold_kind,
        "n_reference_cells": int(labelled.sum()),
        "reference_accuracy": float(oof_correct.mean()),
        "reference_ece_raw": expected_calibration_error(oof_raw, oof_correct),
        "reference_ece_calibrated": expected_calibration_error(cross_fitted_confidence(oof_raw, oof_correct, folds),
                                                               oof_correct),
        "unknown_confidence": float(unknown_confidence), "distance_threshold": distance_threshold,
        "n_unknown": int((label == UNKNOWN).sum()), "n_unknown_far": int(far.sum()),
        "n_unknown_unsure": int(unsure.sum()),
    }
    return target if copy else None


# ------------------------------------------------------------------ the reference's UMAP, and the query on it
def project_umap(query: ad.AnnData, reference: ad.AnnData, *, use_rep: str = "X_atlasformer", n_neighbors: int = 15,
                 key_added: str = "X_umap", seed: int = 0, copy: bool = False) -> ad.AnnData | None:
    """Place ``query`` on ``reference``'s UMAP, which stays fixed, as ``sc.tl.ingest`` does.

    Each query cell's nearest reference cells in ``obsm[use_rep]`` (exact) give it UMAP's fuzzy membership
    weights; it starts at their weighted mean position and is refined by UMAP's layout optimisation with every
    reference cell held in place (umap-learn's ``UMAP.transform``, which ``sc.tl.ingest`` calls; ingest itself is
    not used because it fails with pynndescent 0.7).

    Parameters
    ----------
    query, reference
        Cells with the same representation in ``obsm[use_rep]``.
    use_rep
        The representation neighbours are found in.
    n_neighbors
        Reference neighbours per query cell (and of the reference's own UMAP when it is computed here).
    key_added
        The query's ``obsm`` key for its coordinates; the reference's UMAP is read from ``obsm['X_umap']``.
    seed
        Seed of the reference's UMAP and of the optimisation.
    copy
        Return a copy of ``query`` instead of writing into it.

    Returns
    -------
    The query copy with ``copy=True``, else None. Writes ``query.obsm[key_added]`` (cells, 2). When the reference
    has no ``obsm['X_umap']``, one is computed (``sc.pp.neighbors`` on ``use_rep``, then ``sc.tl.umap``) and written
    into ``reference.obsm['X_umap']`` and ``reference.uns['umap']``, as ``sc.tl.umap`` would.
    """
    reference_rep = representation_of(reference, use_rep, "the reference")
    rep = representation_of(query, use_rep, "the query")
    if "X_umap" not in reference.obsm:
        reference_umap(reference, reference_rep, n_neighbors, seed)
    params = reference.uns.get("umap", {}).get("params", {})
    a, b = (params["a"], params["b"]) if "a" in params and "b" in params else umap_curve()
    coordinates = place_on_layout(reference_rep, np.asarray(reference.obsm["X_umap"], dtype=np.float32), rep,
                                  n_neighbors=n_neighbors, a=float(a), b=float(b), seed=seed)
    target = query.copy() if copy else query
    target.obsm[key_added] = coordinates
    return target if copy else None


def umap_curve(spread: float = 1.0, min_dist: float = 0.5) -> tuple[float, float]:
    """UMAP's ``(a, b)`` for scanpy's default spread and min_dist, for a reference UMAP made elsewhere."""
    from umap.umap_ import find_ab_params

    a, b = find_ab_params(spread, min_dist)
    return float(a), float(b)


def reference_umap(reference: ad.AnnData, reference_rep: np.ndarray, n_neighbors: int, seed: int) -> None:
    """Compute the reference's UMAP on its representation (in a scratch AnnData, so the reference's own neighbour
    graph is left alone) and write ``obsm['X_umap']`` and ``uns['umap']`` into ``reference``."""
    import scanpy as sc

    scratch = ad.AnnData(obs=pd.DataFrame(index=reference.obs_names.astype(str)))
    scratch.obsm["X_rep"] = reference_rep
    # exact neighbours (scikit-learn): scanpy 1.11's pynndescent path fails on scipy 1.17's csr_array above 4,096 cells
    sc.pp.neighbors(scratch, use_rep="X_rep", n_neighbors=min(n_neighbors, reference.n_obs - 1), random_state=seed,
                    transformer="sklearn")
    sc.tl.umap(scratch, random_state=seed)
    reference.obsm["X_umap"] = scratch.obsm["X_umap"]
    reference.uns["umap"] = scratch.uns["umap"]


def place_on_layout(reference_rep: np.ndarray, reference_layout: np.ndarray, rep: np.ndarray, *, n_neighbors: int,
                    a: float, b: float, seed: int = 0) -> np.ndarray:
    """(cells, 2) positions of ``rep``'s cells on ``reference_layout``, the reference held fixed (UMAP's transform
    with exact neighbours)."""
    import scipy.sparse as sp
    from umap.layouts import optimize_layout_euclidean
    from umap.umap_ import (
        compute_membership_strengths,
        init_graph_transform,
        make_epochs_per_sample,
        smooth_knn_dist,
    )

    k = min(n_neighbors, len(reference_rep))
    distances, neighbours = NearestNeighbors(n_neighbors=k).fit(reference_rep).kneighbors(rep)  # (cells, k) each
    distances = distances.astype(np.float32)
    sigmas, rhos = smooth_knn_dist(distances, float(k), local_connectivity=0.0)  # as UMAP.transform: connectivity 1 - 1
    rows, cols, vals, _ = compute_membership_strengths(neighbours.astype(np.int32), distances, sigmas, rhos,
                                                       bipartite=True)
    graph = sp.coo_matrix((vals, (rows, cols)), shape=(len(rep), len(reference_rep)))
    csr = graph.tocsr()
    csr.eliminate_zeros()
    layout = init_graph_transform(csr, reference_layout).astype(np.float32)  # weighted mean of neighbour positions
    n_epochs = 100 if len(rep) <= 10_000 else 30
    graph.data[graph.data < graph.data.max() / n_epochs] = 0.0  # UMAP drops edges too weak to be sampled
    graph.eliminate_zeros()
    rng_state = np.random.default_rng([seed, 0x554D]).integers(-(2**31) + 1, 2**31 - 1, 3).astype(np.int64)
    return optimize_layout_euclidean(layout, reference_layout.copy(), graph.row, graph.col, n_epochs,
                                     len(reference_rep), make_epochs_per_sample(graph.data, n_epochs), a, b, rng_state,
                                     1.0, 0.25, 5.0, move_other=False)


# ------------------------------------------------------------------ representations
def gene_columns(adata: ad.AnnData, tokenizer: CellTokenizer | None, gene_key: str | None, source: str
                 ) -> dict[str, int]:
    """Each gene's first column by name: as the model names genes when there is a tokenizer (so Ensembl IDs and
    symbols meet), else as ``var[gene_key]`` / ``var_names`` name them."""
    if tokenizer is not None:
        return path_gene_columns(adata, tokenizer, gene_key, source)
    names = adata.var[gene_key] if gene_key else adata.var_names
    columns: dict[str, int] = {}
    for i, name in enumerate(names.astype(str)):
        columns.setdefault(name, i)
    return columns


def expression_pcs(reference: ad.AnnData, query: ad.AnnData, *, layer: str | None = None, gene_key: str | None = None,
                   tokenizer: CellTokenizer | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """PCs of log-normalised HVGs of the genes both share: counts per 10,000 of those genes then log1p, the
    reference's 2,000 HVGs (seurat flavour) and 50 PCs fitted on the reference, applied to both.

    Returns ``(reference PCs, query PCs, number of shared genes)``; an error when fewer than
    :data:`MIN_SHARED_GENES` genes are shared.
    """
    ref_columns = gene_columns(reference, tokenizer, gene_key, "reference")
    query_columns = gene_columns(query, tokenizer, gene_key, "query")
    shared = [g for g in ref_columns if g in query_columns]
    if len(shared) < MIN_SHARED_GENES:
        raise InputError(f"reference and query share {len(shared)} genes (reference {len(ref_columns)}, query "
                         f"{len(query_columns)}, e.g. {list(ref_columns)[:3]} vs {list(query_columns)[:3]}); the "
                         f"expression representation needs at least {MIN_SHARED_GENES}. Name genes alike in both "
                         "files (gene_key= naming a var column of symbols or Ensembl IDs in both, or pass the model, "
                         "whose gene table maps one to the other), or map with representation='embedding', which "
                         "needs no shared genes.")
    # depth-normalised over the shared genes only, so a query measuring fewer genes is not read as shallower
    ref_x = log_normalize(read_counts(reference, layer, "reference")[:, [ref_columns[g] for g in shared]])
    query_x = log_normalize(read_counts(query, layer, "query")[:, [query_columns[g] for g in shared]])
    hvgs = select_hvgs(ref_x, N_HVGS)
    ref_x, query_x = ref_x[:, hvgs].toarray(), query_x[:, hvgs].toarray()  # (cells, HVGs)
    n_components = max(1, min(N_PCS, ref_x.shape[0] - 1, ref_x.shape[1]))
    pca = PCA(n_components=n_components, random_state=seed).fit(ref_x)
    return pca.transform(ref_x).astype(np.float32), pca.transform(query_x).astype(np.float32), len(shared)


def unit_total_variance(block: np.ndarray, reference_block: np.ndarray) -> np.ndarray:
    """``block`` centred and scaled by the reference's statistics so the reference's total variance is 1."""
    centre = reference_block.mean(0)
    return ((block - centre) / np.sqrt(reference_block.var(0).sum() + 1e-12)).astype(np.float32)


def load_embedder(model, *, layer: str | None = None, gene_key: str | None = None, cpu: bool = False):
    """``(embed(adata, source) -> (cells, d_model), tokenizer, weights)`` of ``model``: a fine-tuned folder (or a
    fitted task) embeds with its fine-tuned backbone, any other model folder or name with its pretrained backbone
    (zero-shot, as ``atlasformer.embed``)."""
    from . import TASKS  # the task classes, by the model class each fine-tunes

    net, tokenizer = (None, None) if isinstance(model, FinetunedTask) else load_model_folder(resolve_model(model))
    task_class = next((cls for cls in TASKS.values() if issubclass(cls, FinetunedTask)
                       and isinstance(net, cls.model_class)), None)
    if isinstance(model, FinetunedTask) or task_class is not None:
        task = model if task_class is None else task_class.load(model, FinetuneConfig(cpu=cpu), layer=layer,
                                                                 gene_key=gene_key)
        # the fine-tuned backbone's cell embedding, the same kind for every task (integration's own embed
        # would correct reference and query apart with Harmony)
        return lambda adata, source: FinetunedTask.embed(task, adata, source), task.tokenizer, task.model
    backbone = to_inference_device(getattr(net, "backbone", net), cpu)

    def embed(adata: ad.AnnData, source: str) -> np.ndarray:
        out = np.zeros((adata.n_obs, backbone.config.d_model), dtype=np.float32)
        for rows, emb in iter_model_outputs(backbone, adata, tokenizer, layer=layer, gene_key=gene_key, source=source):
            out[rows] = emb
        return out

    return embed, tokenizer, backbone


def mapping_representation(reference: ad.AnnData, query: ad.AnnData, model, representation: Representation | None, *,
                           layer=None, gene_key=None, cpu=False, seed=0, embedding_weight: float = EMBEDDING_WEIGHT
                           ) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(reference rep, query rep, facts for the provenance)`` of :data:`Representation` ``representation`` (None:
    ``"joint"`` with a model, ``"expression"`` without)."""
    if representation is None:
        representation = "expression" if model is None else "joint"
    if representation not in ("expression", "embedding", "joint"):
        raise InputError(f"representation={representation!r}; choose 'expression', 'embedding' or 'joint'.")
    facts, weights, tokenizer = {"representation": representation}, None, None
    if representation == "joint":
        facts["embedding_weight"] = embedding_weight
    embedded = None
    if representation in ("embedding", "joint"):
        if model is None:
            raise InputError(f"representation={representation!r} needs a model: pass a model folder or name "
                             "(e.g. atlasformer-public-small), or map with representation='expression'.")
        embed, tokenizer, weights = load_embedder(model, layer=layer, gene_key=gene_key, cpu=cpu)
        for adata, source in ((reference, "reference"), (query, "query")):
            facts[f"{source}_genes"] = gene_report(adata, tokenizer, gene_key=gene_key, source=source)
        embedded = embed(reference, "reference"), embed(query, "query")
    elif model is not None:
        logger.warning(f"representation='expression' does not use the model {model}; leave representation unset "
                       "(or 'joint') to put its embedding beside the expression PCs.")
    if representation == "embedding":
        return *embedded, {**facts, "weights": weights}
    ref_pcs, query_pcs, facts["n_shared_genes"] = expression_pcs(reference, query, layer=layer, gene_key=gene_key,
                                                                 tokenizer=tokenizer, seed=seed)
    if representation == "expression":
        return ref_pcs, query_pcs, {**facts, "weights": weights}
    blocks = [(ref_pcs, query_pcs, 1.0), (*embedded, embedding_weight)]
    return (np.hstack([w * unit_total_variance(r, r) for r, _, w in blocks]),
            np.hstack([w * unit_total_variance(q, r) for r, q, w in blocks]), {**facts, "weights": weights})


# ------------------------------------------------------------------ labels from a fine-tuned classifier
def fine_tuned_annotator(model, *, layer=None, gene_key=None, cpu: bool = False):
    """The fitted :class:`~atlasformer.finetune.Annotator` that ``model`` is (or whose folder it names), else None."""
    from .annotation import Annotator

    if isinstance(model, Annotator):
        return model
    if model is None or isinstance(model, FinetunedTask):
        return None
    net, _ = load_model_folder(resolve_model(model))
    if not isinstance(net, Annotator.model_class):
        return None
    return Annotator.load(model, FinetuneConfig(cpu=cpu), layer=layer, gene_key=gene_key)


def classifier_labels(target: ad.AnnData, annotator, query: ad.AnnData, *, key_added: str = "atlasformer",
                      unknown_confidence: float = CONFIDENCE_THRESHOLD, source: str = "query") -> None:
    """Replace the kNN's labels in ``target`` (written by :func:`transfer_labels`) by the fine-tuned classifier's.

    A fine-tuned annotation head (the annotation recipe: logistic regression on the embedding beside the
    log-normalised HVGs) transfers labels better than any kNN (benchmarks/results/mapping.md), and its
    probabilities are the confidence. The kNN's neighbour distance still calls cells far from every reference cell
    ``"unknown"``, as do confidences below ``unknown_confidence``.
    """
    probabilities, classes = annotator.predict_proba(query, source)  # (cells, classes)
    mapping = dict(target.uns[f"{key_added}_mapping"])
    confidence = probabilities.max(1)
    argmax = classes[probabilities.argmax(1)].astype(str)
    far = target.obs[f"{key_added}_neighbour_distance"].to_numpy() > mapping["distance_threshold"]
    unsure = confidence < unknown_confidence
    label = np.where(far | unsure, UNKNOWN, argmax)
    names = [str(c) for c in classes]
    target.obs[f"{key_added}_label"] = pd.Categorical(label, categories=[*names, UNKNOWN])
    target.obs[f"{key_added}_label_argmax"] = pd.Categorical(argmax, categories=names)
    target.obs[f"{key_added}_confidence"] = confidence.astype(np.float32)
    target.obs[f"{key_added}_uncertainty"] = (1.0 - confidence).astype(np.float32)
    target.obsm[f"{key_added}_label_probabilities"] = probabilities.astype(np.float32)
    target.uns[f"{key_added}_label_probabilities_names"] = np.asarray(names, dtype=str)
    mapping.update(labels_from="fine-tuned classifier", n_unknown=int((label == UNKNOWN).sum()),
                   n_unknown_far=int(far.sum()), n_unknown_unsure=int(unsure.sum()))
    target.uns[f"{key_added}_mapping"] = mapping


# ------------------------------------------------------------------ the whole recipe
def map_query(reference: ad.AnnData, query: ad.AnnData, model: str | os.PathLike | FinetunedTask | None = None, *,
              labels_key: str, batch_key: str | None = None, layer: str | None = None, gene_key: str | None = None,
              representation: Representation | None = None, embedding_weight: float = EMBEDDING_WEIGHT,
              n_neighbors: int = 15,
              unknown_confidence: float = CONFIDENCE_THRESHOLD, key_added: str = "atlasformer", with_x: bool = False,
              cpu: bool = False, seed: int = 0) -> ad.AnnData:
    """Map ``query`` onto a labelled ``reference``: a representation of both, labels transferred by calibrated
    weighted kNN (:func:`transfer_labels`), and the query placed on the reference's UMAP (:func:`project_umap`).

    Parameters
    ----------
    reference, query
        Raw counts (``X`` or ``layers[layer]``); the genes may overlap only in part.
    model
        A model folder or name (zero-shot embedding of its pretrained backbone), a fine-tuned folder or fitted task
        (its fine-tuned backbone's embedding); needed for ``representation`` ``"embedding"`` and ``"joint"``. A
        fine-tuned annotation folder (or fitted :class:`~atlasformer.finetune.Annotator`) also gives the labels:
        its classifier replaces the kNN vote (:func:`classifier_labels`).
    labels_key, batch_key
        The reference's label column, and its batch column (the calibration's folds; recommended).
    layer, gene_key
        Where counts and gene identifiers are, in both.
    representation
        See :data:`Representation`: ``"expression"``, ``"embedding"`` or ``"joint"``; None (default) is ``"joint"``
        with a model and ``"expression"`` without (measured on kang: see the module docstring).
    embedding_weight
        Weight of the embedding block in ``"joint"`` (the PCs have weight 1).
    n_neighbors, unknown_confidence
        As :func:`transfer_labels`.
    key_added
        Prefix of the label keys (FORMATS.md: ``obs['atlasformer_label']``, ``obs['atlasformer_uncertainty']``).
    with_x
        Copy the query's ``X`` into the result.
    cpu
        Run the model on the CPU even when there is a GPU.
    seed
        Seed of the PCA, the random folds and the UMAP.

    Returns
    -------
    AnnData
        A new AnnData with the query's obs and var (``X`` only with ``with_x``), the keys :func:`transfer_labels`
        writes, ``obsm['X_atlasformer']`` (the representation the mapping used, in the reference's space),
        ``obsm['X_umap']`` (the position on the reference's UMAP) and their provenance in
        ``uns['atlasformer']``. When the reference has no ``obsm['X_umap']``, one is computed on the representation
        and written into ``reference`` (in memory), so :func:`plot_mapping` and later queries use that layout.
    """
    reference_labels(reference, labels_key)  # bad keys fail before any model runs
    check_obs_key(reference.obs, batch_key, source="reference", what="batch_key")
    # a fine-tuned annotation folder is loaded once: it embeds (its backbone) and labels (its classifier)
    annotator = fine_tuned_annotator(model, layer=layer, gene_key=gene_key, cpu=cpu)
    reference_rep, query_rep, facts = mapping_representation(reference, query, annotator or model, representation,
                                                             layer=layer, gene_key=gene_key, cpu=cpu, seed=seed,
                                                             embedding_weight=embedding_weight)
    keep = list(dict.fromkeys([labels_key, *([batch_key] if batch_key else [])]))
    scratch = ad.AnnData(obs=reference.obs[keep].copy())  # the reference as the kNN and the layout need it
    scratch.obsm["X_atlasformer"] = reference_rep
    if "X_umap" in reference.obsm:
        scratch.obsm["X_umap"] = reference.obsm["X_umap"]
        scratch.uns["umap"] = reference.uns.get("umap", {})
    target = output_adata(query, with_x)
    before = annotation_snapshot(target)
    target.obsm["X_atlasformer"] = query_rep
    transfer_labels(target, scratch, labels_key=labels_key, batch_key=batch_key, n_neighbors=n_neighbors,
                    unknown_confidence=unknown_confidence, key_added=key_added, seed=seed)
    if annotator is not None:
        classifier_labels(target, annotator, query, key_added=key_added, unknown_confidence=unknown_confidence)
    project_umap(target, scratch, n_neighbors=n_neighbors, seed=seed)
    if "X_umap" not in reference.obsm:
        reference.obsm["X_umap"], reference.uns["umap"] = scratch.obsm["X_umap"], scratch.uns["umap"]
    settings = {k: v for k, v in facts.items() if k != "weights"} | {
        "labels_key": labels_key, "batch_key": batch_key, "gene_key": gene_key, "n_neighbors": n_neighbors,
        "unknown_confidence": unknown_confidence, "seed": seed}
    source = getattr(model, "model_source", model)  # a fitted task: the folder it was fine-tuned from
    record_provenance(target, changed_keys(before, target), model="none (expression PCs)" if source is None else source,
                      layer=layer, settings=settings, weights=facts["weights"])
    return target


def plot_mapping(reference: ad.AnnData, query: ad.AnnData, path: str | Path | None = None, *, labels_key: str,
                 key_added: str = "atlasformer", max_cells: int = 50_000, seed: int = 0) -> Figure:
    """The reference's UMAP coloured by its labels, and the query on it coloured by its transferred labels (the
    reference in grey behind; ``"unknown"`` in black); each label has one colour in both panels.

    Parameters
    ----------
    reference
        With ``obsm['X_umap']`` (written by :func:`map_query` when it was absent) and ``obs[labels_key]``.
    query
        The result of :func:`map_query`: ``obsm['X_umap']`` and ``obs['<key_added>_label']``.
    path
        Where to save the figure (PNG, written to a temporary file and renamed into place); not saved when None.
    labels_key
        The reference's label column.
    key_added
        The prefix :func:`map_query` wrote the labels under.
    max_cells
        Larger reference or query sets are subsampled (seeded) to this many cells each.
    seed
        Seed of the subsample.

    Returns
    -------
    Figure
        The figure, two axes.
    """
    from .plots import new_figure, save_figure

    label_key = f"{key_added}_label"
    for adata, what, key in ((reference, "reference", labels_key), (query, "query", label_key)):
        if "X_umap" not in adata.obsm or key not in adata.obs:
            raise InputError(f"the {what} has no obsm['X_umap'] or no obs[{key!r}]: pass the reference and the "
                             "query map_query mapped onto it (it writes both).")
    ref_labels = reference.obs[labels_key].astype(str).to_numpy()
    query_labels = query.obs[label_key].astype(str).to_numpy()
    names = sorted((set(ref_labels) | set(query_labels)) - {UNKNOWN})
    colours = {**label_colours(names), UNKNOWN: "black"}
    ref_rows, query_rows = _subsample(reference.n_obs, max_cells, seed), _subsample(query.n_obs, max_cells, seed)
    ref_xy, query_xy = np.asarray(reference.obsm["X_umap"])[ref_rows], np.asarray(query.obsm["X_umap"])[query_rows]
    fig = new_figure(12, 5.5)
    left, right = fig.subplots(1, 2)
    _scatter_by_label(left, ref_xy, ref_labels[ref_rows], colours)
    left.set_title(f"reference ({reference.n_obs:,} cells): {labels_key}")
    right.scatter(ref_xy[:, 0], ref_xy[:, 1], s=2, color="lightgrey", rasterized=True)
    _scatter_by_label(right, query_xy, query_labels[query_rows], colours)
    right.set_title(f"query ({query.n_obs:,} cells) on the reference: transferred label")
    _legend(right, ref_labels, query_labels, colours)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
    return save_figure(fig, path)


def label_colours(names: list[str]) -> dict:
    """A colour per label from tab10 then tab20, leaving out their greys (grey is the reference behind the query,
    black is unknown)."""
    from matplotlib import colormaps

    palette = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7]
    palette += [c for i, c in enumerate(colormaps["tab20"].colors) if i not in (14, 15) and c not in palette]
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _legend(ax, ref_labels: np.ndarray, query_labels: np.ndarray, colours: dict) -> None:
    """One legend for both panels: every label with its cells in the reference and in the query."""
    from matplotlib.lines import Line2D

    ref_counts, query_counts = pd.Series(ref_labels).value_counts(), pd.Series(query_labels).value_counts()
    handles = [Line2D([], [], marker="o", linestyle="", color="lightgrey", label="reference (behind the query)")]
    for name, colour in colours.items():
        if name in ref_counts or name in query_counts:
            handles.append(Line2D([], [], marker="o", linestyle="", color=colour,
                                  label=f"{name} ({ref_counts.get(name, 0):,} / {query_counts.get(name, 0):,})"))
    ax.legend(handles=handles, title="label (reference / query cells)", fontsize=7, title_fontsize=7,
              loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def _subsample(n: int, max_cells: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False)) if n > max_cells else np.arange(n)


def _scatter_by_label(ax, xy: np.ndarray, labels: np.ndarray, colours: dict) -> None:
    for name in [*sorted(set(labels) - {UNKNOWN}), *([UNKNOWN] if UNKNOWN in set(labels) else [])]:
        rows = labels == name
        ax.scatter(xy[rows, 0], xy[rows, 1], s=3, color=colours[name], rasterized=True)
