"""Plots written by the tasks into their output folders (PNG; scanpy and matplotlib underneath)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def umap_panels(embeddings: dict[str, np.ndarray], obs: pd.DataFrame, color: str, path: str | Path, *,
                max_cells: int = 20_000, seed: int = 0) -> Path:
    """One UMAP per embedding (side by side), cells coloured by ``obs[color]``, saved as a PNG.

    Large inputs are subsampled (seeded) to ``max_cells`` cells, the same cells in every panel.
    """
    import anndata as ad
    import scanpy as sc

    plt = _pyplot()
    n = len(obs)
    rows = np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False)) if n > max_cells else np.arange(n)
    frame = pd.DataFrame({color: pd.Categorical(obs[color].astype(str).to_numpy()[rows])},
                         index=pd.Index([str(i) for i in rows]))
    fig, axes = plt.subplots(1, len(embeddings), figsize=(5.5 * len(embeddings), 4.5), squeeze=False)
    for ax, (name, emb) in zip(axes[0], embeddings.items()):
        view = ad.AnnData(obs=frame.copy())
        view.obsm["X_emb"] = np.asarray(emb, dtype=np.float32)[rows]
        sc.pp.neighbors(view, use_rep="X_emb", n_neighbors=15, random_state=seed)
        sc.tl.umap(view, random_state=seed)
        sc.pl.umap(view, color=color, ax=ax, show=False, title=f"{name}: {color}", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def predicted_vs_observed(true: np.ndarray, pred: np.ndarray, names: list[str], path: str | Path, *,
                          max_panels: int = 12, xlabel: str = "observed", ylabel: str = "predicted") -> Path:
    """Scatter of predicted against observed values, one panel per feature (the first ``max_panels``)."""
    plt = _pyplot()
    k = min(max_panels, len(names))
    cols = min(4, k)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for j, ax in enumerate(axes.ravel()):
        if j >= k:
            ax.axis("off")
            continue
        ax.scatter(true[:, j], pred[:, j], s=3, alpha=0.5)
        r = np.corrcoef(true[:, j], pred[:, j])[0, 1] if true[:, j].std() > 0 and pred[:, j].std() > 0 else float("nan")
        ax.set_title(f"{names[j]} (r={r:.2f})", fontsize=8)
        ax.set_xlabel(xlabel, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def roc_curve_plot(true: np.ndarray, prob: np.ndarray, path: str | Path, title: str = "") -> Path:
    """ROC curve over all entries of a binary matrix (ATAC accessibility)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    true, prob = np.asarray(true).ravel() > 0, np.asarray(prob).ravel()
    fpr, tpr, _ = roc_curve(true, prob)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"AUROC {roc_auc_score(true, prob):.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or "ROC (all entries)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def metric_bars(values: dict[str, dict[str, float]], path: str | Path, title: str = "") -> Path:
    """Grouped bars: ``values[method][metric]`` (e.g. scib aggregates of each embedding)."""
    plt = _pyplot()
    methods = list(values)
    metrics = list(next(iter(values.values())))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(1.6 * len(metrics) + 2, 3.5))
    for i, method in enumerate(methods):
        ax.bar(np.arange(len(metrics)) + i * width, [values[method][m] for m in metrics], width, label=method)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(methods) - 1) / 2, metrics)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
