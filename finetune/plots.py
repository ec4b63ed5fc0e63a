"""Plots of the tasks' results: each function returns a matplotlib ``Figure`` and, given a path, saves it too.

Figures are built as ``matplotlib.figure.Figure`` objects, not through pyplot: saving one needs no GUI
backend, so the backend is never switched (a notebook keeps its own), and a notebook shows a returned
figure as the cell's result.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from atlasformer.tokenization.outputs import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def new_figure(width: float, height: float) -> Figure:
    """A figure that belongs to no pyplot backend (so creating and saving it switches nothing)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save_figure(fig: Figure, path: str | os.PathLike | None, dpi: int = 100) -> Figure:
    """Lay ``fig`` out and, when ``path`` is given, write it there as PNG: to a temporary file beside it, then
    renamed into place, so a reader never sees a half-written figure. Returns ``fig``."""
    fig.tight_layout()
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    return fig


def umap_panels(embeddings: dict[str, np.ndarray], obs: pd.DataFrame, color: str, path: str | Path | None = None, *,
                max_cells: int = 20_000, seed: int = 0) -> Figure:
    """One UMAP per embedding, side by side, cells coloured by ``obs[color]``.

    Parameters
    ----------
    embeddings
        ``{name: (cells, dims) array}``, rows as ``obs``.
    obs
        The cells' annotations.
    color
        The ``obs`` column to colour by.
    path
        Where to save the figure (PNG); not saved when None.
    max_cells
        Larger inputs are subsampled (seeded) to this many cells, the same cells in every panel.
    seed
        Seed of the subsample, the neighbour graph and UMAP.

    Returns
    -------
    Figure
        The figure, one axes per embedding.
    """
    import anndata as ad
    import scanpy as sc

    n = len(obs)
    rows = np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False)) if n > max_cells else np.arange(n)
    frame = pd.DataFrame({color: pd.Categorical(obs[color].astype(str).to_numpy()[rows])},
                         index=pd.Index([str(i) for i in rows]))
    fig = new_figure(5.5 * len(embeddings), 4.5)
    axes = fig.subplots(1, len(embeddings), squeeze=False)[0]
    for ax, (name, emb) in zip(axes, embeddings.items()):
        view = ad.AnnData(obs=frame.copy())
        view.obsm["X_emb"] = np.asarray(emb, dtype=np.float32)[rows]
        # exact neighbours: scanpy 1.11's default (pynndescent) path fails from 4,096 cells under scipy >= 1.15
        # ('csr_array' object has no attribute 'getnnz')
        sc.pp.neighbors(view, use_rep="X_emb", n_neighbors=15, random_state=seed, transformer="sklearn")
        sc.tl.umap(view, random_state=seed)
        sc.pl.umap(view, color=color, ax=ax, show=False, title=f"{name}: {color}", frameon=False)
    return save_figure(fig, path)


def predicted_vs_observed(true: np.ndarray, pred: np.ndarray, names: list[str], path: str | Path | None = None, *,
                          max_panels: int = 12, xlabel: str = "observed", ylabel: str = "predicted",
                          feature_kind: str = "features", title: str | None = None, baseline: np.ndarray | None = None,
                          baseline_label: str = "baseline") -> Figure:
    """Predicted against observed values, one panel per feature, with the y = x line of a perfect prediction.

    Every feature is shown up to ``max_panels``; beyond that the most variable (observed) ones, and the
    title says so ("12 of 40 proteins, the most variable").

    Parameters
    ----------
    true, pred
        (cells, features) observed and predicted values, columns as ``names``.
    names
        Feature names.
    path
        Where to save the figure (PNG); not saved when None.
    max_panels
        The most panels drawn.
    xlabel, ylabel
        Axis labels (the values' scale).
    feature_kind
        What the features are, for the title ("proteins", "genes").
    title
        Replaces the generated title (which says which features are shown); the caller's own wording
        when it chose ``names`` itself.
    baseline
        (cells, features) predictions of a baseline, drawn in grey behind the model's when given.
    baseline_label
        The baseline's name in the panel titles and the legend.

    Returns
    -------
    Figure
        The figure, one axes per panel (unused grid cells hidden).
    """
    true, pred = np.asarray(true, dtype=float), np.asarray(pred, dtype=float)
    shown = most_variable_columns(true, max_panels)
    cols = min(4, len(shown))
    rows = -(-len(shown) // cols)
    fig = new_figure(3 * cols, 3 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, j in zip(axes, shown):
        panel_title = f"{names[j]}: r={correlation(true[:, j], pred[:, j]):.2f}, RMSE {rmse(true[:, j], pred[:, j]):.2f}"
        if baseline is not None:  # r is undefined for a constant baseline (the mean): compare RMSE
            base = np.asarray(baseline, dtype=float)[:, j]
            ax.scatter(true[:, j], base, s=3, alpha=0.4, color="tab:grey", label=baseline_label)
            panel_title += f"\n{baseline_label}: RMSE {rmse(true[:, j], base):.2f}"
        ax.scatter(true[:, j], pred[:, j], s=3, alpha=0.5, color="tab:blue", label="model")
        ax.axline((0, 0), slope=1, color="black", linewidth=0.8, linestyle="--", label="y = x")
        ax.set_title(panel_title, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=7)
    for ax in axes[len(shown):]:
        ax.axis("off")
    axes[0].legend(fontsize=6, loc="upper left", markerscale=3)
    n = len(names)
    fig.suptitle(title or (f"all {n} {feature_kind}" if len(shown) == n else
                           f"{len(shown)} of {n} {feature_kind}, the most variable"), fontsize=10)
    return save_figure(fig, path)


def most_variable_columns(values: np.ndarray, limit: int) -> np.ndarray:
    """Indices of every column when there are at most ``limit``, else of the ``limit`` most variable, most first."""
    if values.shape[1] <= limit:
        return np.arange(values.shape[1])
    return np.argsort(-np.nan_to_num(np.nanvar(values, axis=0)), kind="stable")[:limit]


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r, NaN when either side is constant."""
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def rmse(true: np.ndarray, pred: np.ndarray) -> float:
    """Root mean squared error over the finite pairs."""
    finite = np.isfinite(true) & np.isfinite(pred)
    return float(np.sqrt(np.mean((true[finite] - pred[finite]) ** 2))) if finite.any() else float("nan")


def roc_curve_plot(true: np.ndarray, prob: np.ndarray, path: str | Path | None = None, title: str = "") -> Figure:
    """ROC curve over all entries of a binary matrix (ATAC accessibility), with the chance diagonal.

    Parameters
    ----------
    true, prob
        Observed (> 0: positive) and predicted probabilities, any shape, compared entry by entry.
    path
        Where to save the figure (PNG); not saved when None.
    title
        The axes title (default "ROC (all entries)").

    Returns
    -------
    Figure
        The figure, one axes.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    true, prob = np.asarray(true).ravel() > 0, np.asarray(prob).ravel()
    fpr, tpr, _ = roc_curve(true, prob)
    fig = new_figure(4.5, 4.5)
    ax = fig.subplots()
    ax.plot(fpr, tpr, label=f"AUROC {roc_auc_score(true, prob):.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or "ROC (all entries)")
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def metric_bars(values: dict[str, dict[str, float]], path: str | Path | None = None, title: str = "", *,
                lower_is_better: Collection[str] = ()) -> Figure:
    """One bar panel per metric (their scales differ), one bar per method, each panel stating its direction.

    Parameters
    ----------
    values
        ``values[method][metric]``, e.g. the scib aggregates of each embedding.
    path
        Where to save the figure (PNG); not saved when None.
    title
        The figure's title.
    lower_is_better
        Metrics where lower is better (a loss, an NLL); the others are titled "higher is better".

    Returns
    -------
    Figure
        The figure, exactly one axes per metric.
    """
    methods = list(values)
    metrics = list(dict.fromkeys(m for per_method in values.values() for m in per_method))
    fig = new_figure(max(2.6, 0.45 * len(methods) + 1.2) * len(metrics), 3.6)
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
        heights = [values[method].get(metric, np.nan) for method in methods]
        ax.bar(range(len(methods)), heights, color=[f"C{i % 10}" for i in range(len(methods))])
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{metric}\n({'lower' if metric in lower_is_better else 'higher'} is better)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_confusion_matrix(true: np.ndarray, pred: np.ndarray, path: str | Path | None = None, title: str = "") -> Figure:
    """Confusion matrix: the count of cells in every cell of the grid, coloured by the fraction of its true class.

    Parameters
    ----------
    true, pred
        True and predicted labels, one per cell.
    path
        Where to save the figure (PNG); not saved when None.
    title
        The first line of the title; the second gives the accuracy ("accuracy 0.912 over 340 cells").

    Returns
    -------
    Figure
        The figure: the matrix's axes and its colour bar's.
    """
    from sklearn.metrics import confusion_matrix

    true, pred = np.asarray(true).astype(str), np.asarray(pred).astype(str)
    labels = sorted(set(true) | set(pred))
    counts = confusion_matrix(true, pred, labels=labels)
    fractions = counts / np.maximum(counts.sum(1, keepdims=True), 1)  # colour: comparable across class sizes
    size = max(4, 0.5 * len(labels) + 2)
    fig = new_figure(size, size)
    ax = fig.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    write_counts(ax, counts, fractions)
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = float(np.mean(true == pred)) if len(true) else float("nan")
    ax.set_title("\n".join(filter(None, [title, f"accuracy {accuracy:.3f} over {len(true):,} cells"])))
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    return save_figure(fig, path)


def write_counts(ax: Axes, counts: np.ndarray, fractions: np.ndarray) -> None:
    """Write each count in its grid cell, white on dark cells; small enough to fit many classes."""
    fontsize = max(4.0, min(9.0, 110 / max(1, len(counts))))
    for (i, j), count in np.ndenumerate(counts):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=fontsize,
                color="white" if fractions[i, j] > 0.5 else "black")
