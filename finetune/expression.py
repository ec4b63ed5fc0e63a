"""The expression path beside the embedding, and the closed-form fit of the linear readout.

The simple baselines win on small data because they see the log-normalised expression of highly variable
genes (logistic regression on HVGs, ridge on their principal components). A task model with an expression
path sees the same features next to its cell embedding, so pretraining can only add to what the baseline
does: the readout is linear, and fitted on the training cells by the baseline's own estimator (L2 logistic
regression with C=1 for classes, RidgeCV for protein, per-peak logistic regression for ATAC) over
[standardised embedding; expression features]. With the embedding's weights at zero it *is* the baseline.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, RidgeCV

from atlasformer.model_zoo.task_heads import EmbeddingStandardiser, ExpressionPath, LinearReadout
from atlasformer.tokenization import CellTokenizer, InputError

from .baselines import RIDGE_ALPHAS, log_normalize, select_hvgs
from .common import cross_fitting_folds, frozen_embeddings, model_gene_keys, read_counts

logger = logging.getLogger(__name__)


def path_gene_columns(adata: ad.AnnData, tokenizer: CellTokenizer, gene_key=None, source: str = "data") -> dict[str, int]:
    """Each gene's first column, named as the expression path names genes: its vocabulary key where it resolves,
    else its name in the file (so the path sees every gene the baselines see, resolvable or not)."""
    keys = model_gene_keys(adata, tokenizer, gene_key, source)
    raw = adata.var[gene_key] if gene_key else adata.var_names
    columns: dict[str, int] = {}
    for i, (key, name) in enumerate(zip(keys, raw)):
        label = str(key) if key is not None and key == key else str(name)
        columns.setdefault(label, i)
    return columns


def choose_expression_genes(adata: ad.AnnData, tokenizer: CellTokenizer, rows: np.ndarray, n_genes: int, *,
                            layer=None, gene_key=None, source: str = "data") -> list[str]:
    """The ``n_genes`` HVGs (scanpy, seurat flavour) of the training cells at ``rows``, as the baselines choose
    them (log-normalised over all of each cell's counts)."""
    columns = path_gene_columns(adata, tokenizer, gene_key, source)
    names, cols = list(columns), np.fromiter(columns.values(), dtype=np.int64)
    log_counts = log_normalize(read_counts(adata, layer, source)[rows])[:, cols]
    return [names[i] for i in select_hvgs(log_counts, n_genes)]


def expression_inputs(adata: ad.AnnData, genes: list[str], tokenizer: CellTokenizer, *, layer=None, gene_key=None,
                      source: str = "data") -> np.ndarray:
    """(cells, genes) log-normalised expression (log1p of counts per 10,000 of the whole cell) of ``genes``;
    a gene the file lacks reads as 0 (not expressed)."""
    columns = path_gene_columns(adata, tokenizer, gene_key, source)
    present = [i for i, g in enumerate(genes) if g in columns]
    if len(present) < 0.5 * len(genes):
        logger.warning(f"{source}: only {len(present)} of the model's {len(genes)} expression-path genes are in "
                       "this file; the missing ones read as not expressed.")
    out = np.zeros((adata.n_obs, len(genes)), dtype=np.float32)
    if present:
        log_counts = log_normalize(read_counts(adata, layer, source))
        out[:, present] = log_counts[:, [columns[genes[i]] for i in present]].toarray()
    return out


def n_expression_components(requested: int, n_train: int, n_genes: int) -> int:
    """PCs the expression path can have: at most one fewer than the training cells, and no more than genes."""
    return 0 if requested <= 0 else max(1, min(requested, n_train - 1, n_genes))


@torch.no_grad()
def fit_expression_path(path: ExpressionPath, x_train: np.ndarray, seed: int = 0) -> None:
    """Set the path's centring (and PCA loadings) from the training cells' log-normalised expression."""
    n_components = path.components.shape[0]
    if n_components:
        pca = PCA(n_components=n_components, random_state=seed).fit(x_train)
        path.mean.copy_(torch.as_tensor(pca.mean_, dtype=torch.float32))
        path.components.copy_(torch.as_tensor(pca.components_, dtype=torch.float32))
    else:
        path.mean.copy_(torch.as_tensor(x_train.mean(0), dtype=torch.float32))


@torch.no_grad()
def path_features(path: ExpressionPath | None, x: np.ndarray | None) -> np.ndarray | None:
    """(cells, d_expr) the expression path's features of ``x``, computed where the path is (a GPU or the CPU)."""
    return None if path is None else path(torch.as_tensor(x).to(path.mean.device)).cpu().numpy()


@torch.no_grad()
def readout_features(readout: LinearReadout, embedding: np.ndarray, features: np.ndarray | None) -> np.ndarray:
    """(cells, d_model + d_expr) what the readout's linear map sees."""
    device = readout.out.weight.device
    expr = None if features is None else torch.as_tensor(features).to(device)
    return readout.features(torch.as_tensor(embedding).to(device), expr).cpu().numpy()


@torch.no_grad()
def standardise_embedding(module: EmbeddingStandardiser | LinearReadout, embedding: np.ndarray,
                          use_embedding: bool = True, *, features: np.ndarray | None = None,
                          weight: float | None = None) -> None:
    """Centre the embedding and scale it on the training cells: each dimension to unit variance or, given the
    expression ``features`` beside it and a ``weight``, the whole embedding to ``weight`` times their total
    variance (so a penalised readout pays for the embedding as for the features, and a small weight keeps it
    close to the baseline). Without ``use_embedding`` the scale is infinite: the embedding reads as zeros and the
    expression path stands alone (an ablation)."""
    module = module.features if isinstance(module, LinearReadout) else module
    module.embedding_mean.copy_(torch.as_tensor(embedding.mean(0), dtype=torch.float32))
    scale = embedding.std(0) + 1e-6
    if features is not None and weight is not None and len(embedding) > 1:
        scale = scale / np.sqrt(weight * features.var(0).sum() / embedding.shape[1] + 1e-12)
    if not use_embedding:
        scale = np.full(embedding.shape[1], np.inf)
    module.embedding_scale.copy_(torch.as_tensor(scale, dtype=torch.float32))


def readout_inputs(model, readout: LinearReadout, cells, tokenizer: CellTokenizer, x: np.ndarray | None,
                   rows: np.ndarray, cfg) -> np.ndarray:
    """(cells, d_model + d_expr) what ``readout`` sees for every cell: the frozen backbone's embedding (computed
    once per cell) beside the expression path's features of ``x``, the embedding scaled on the cells at ``rows``
    (``cfg.use_embedding``, ``cfg.embedding_weight``)."""
    embedding = frozen_embeddings(model.backbone, cells, tokenizer)  # (cells, d_model)
    expr = path_features(model.expression_path, x)  # (cells, d_expr) or None
    standardise_embedding(readout, embedding[rows], cfg.use_embedding,
                          features=None if expr is None else expr[rows], weight=cfg.embedding_weight)
    return readout_features(readout, embedding, expr)


def logistic_weights(z: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(weight (n_classes, features), bias (n_classes,)) of L2 logistic regression (C=1, the logreg baseline's
    estimator) on ``z``; classes absent from ``y`` get weight 0 and a very low bias, so they are never predicted."""
    present = np.unique(y)
    weight = np.zeros((n_classes, z.shape[1]))
    bias = np.full(n_classes, -30.0)
    if len(present) == 1:
        bias[present[0]] = 0.0
    else:
        model = LogisticRegression(C=1.0, max_iter=1000, random_state=seed).fit(z, y)
        if len(present) == 2:  # sklearn's binary model: one logit for the second class against the first
            weight[present[1]], bias[present] = model.coef_[0], (0.0, model.intercept_[0])
        else:
            weight[present], bias[present] = model.coef_, model.intercept_
    return weight, bias


@torch.no_grad()
def fit_logistic_readout(readout: LinearReadout, z: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0,
                         temperature: float = 1.0) -> None:
    """Set ``readout`` to :func:`logistic_weights` on ``z``, its logits divided by ``temperature`` (the argmax,
    so every label, is unchanged; only the confidences soften)."""
    weight, bias = logistic_weights(z, y, n_classes, seed)
    _set_linear(readout.out, weight / temperature, bias / temperature)


def out_of_fold_temperature(z: np.ndarray, y: np.ndarray, n_classes: int, groups: np.ndarray | None = None,
                            seed: int = 0) -> float:
    """The softmax temperature (at least 1) that minimises the negative log-likelihood of out-of-fold logits
    of :func:`logistic_weights` on ``z`` (Guo et al. 2017's temperature scaling, fitted across folds).

    Folds are :func:`~atlasformer.finetune.common.cross_fitting_folds` over ``groups``: the batches when there
    are two or more, so the temperature covers the shift a cell from an unseen batch brings, which is what a
    mapped query is; otherwise seeded random folds. It never goes below 1: random folds within one batch see no
    shift and would sharpen confidences that a new batch then makes overconfident. Held-out cells of a class the fold's training cells lack are left out
    (their logit is the absent class's floor, which says nothing about the temperature).
    """
    logits, truth = [], []
    folds, _ = cross_fitting_folds(groups, len(y), seed)
    for fold in np.unique(folds):
        held = folds == fold
        trained = ~held
        if not trained.any():
            continue
        weight, bias = logistic_weights(z[trained], y[trained], n_classes, seed)
        seen = held & np.isin(y, np.unique(y[trained]))
        logits.append(z[seen] @ weight.T + bias)  # (held-out cells, classes)
        truth.append(y[seen])
    if not logits or sum(len(t) for t in truth) == 0:
        return 1.0
    logits, truth = np.vstack(logits), np.concatenate(truth)

    def nll(log_temperature: float) -> float:
        return float(-log_softmax(logits / np.exp(log_temperature), axis=1)[np.arange(len(truth)), truth].mean())

    return float(np.exp(minimize_scalar(nll, bounds=(0.0, np.log(100.0)), method="bounded").x))


@torch.no_grad()
def fit_ridge_readout(readout: LinearReadout, z: np.ndarray, y: np.ndarray) -> float:
    """Multi-output RidgeCV (the ridge baseline's estimator and alphas) on ``z``; returns the chosen alpha."""
    model = RidgeCV(alphas=RIDGE_ALPHAS).fit(z, np.asarray(y, dtype=np.float64))
    _set_linear(readout.out, model.coef_, model.intercept_)
    return float(model.alpha_)


@torch.no_grad()
def fit_per_feature_logistic_readout(readout: LinearReadout, z: np.ndarray, y: np.ndarray, seed: int = 0,
                                     c: float = 1.0) -> None:
    """One L2 logistic regression (inverse penalty ``c``) per binary target (ATAC peak); a peak with one class in
    training gets its training frequency as a constant."""
    weight, bias = np.zeros((y.shape[1], z.shape[1])), np.zeros(y.shape[1])
    for j in range(y.shape[1]):
        target = y[:, j] > 0.5
        if target.all() or not target.any():
            p = np.clip(target.mean(), 1e-4, 1 - 1e-4)
            bias[j] = np.log(p / (1 - p))
            continue
        model = LogisticRegression(C=c, max_iter=500, random_state=seed).fit(z, target)
        weight[j], bias[j] = model.coef_[0], model.intercept_[0]
    _set_linear(readout.out, weight, bias)


def _set_linear(linear: torch.nn.Linear, weight: np.ndarray, bias: np.ndarray) -> None:
    linear.weight.copy_(torch.as_tensor(weight, dtype=linear.weight.dtype))
    linear.bias.copy_(torch.as_tensor(bias, dtype=linear.bias.dtype))


def expression_setup(adata: ad.AnnData, tokenizer: CellTokenizer, cfg, train_rows: np.ndarray, *, layer=None,
                     gene_key=None, source: str = "data") -> tuple[dict, np.ndarray | None]:
    """The head's config fields (readout, expression genes and components) and the (cells of ``adata``, genes)
    expression path input, chosen on the training cells at ``train_rows`` (None when the path is off)."""
    if not cfg.expression_genes:
        return {"readout": cfg.readout}, None
    if cfg.readout != "linear":
        raise InputError("the expression path needs the linear readout: set readout=linear, or expression_genes=0.")
    genes = choose_expression_genes(adata, tokenizer, train_rows, cfg.expression_genes, layer=layer, gene_key=gene_key,
                                    source=source)
    x = expression_inputs(adata, genes, tokenizer, layer=layer, gene_key=gene_key, source=source)
    n_components = n_expression_components(cfg.expression_pcs or 0, len(train_rows), len(genes))
    return {"readout": "linear", "expression_genes": genes, "expression_components": n_components}, x
