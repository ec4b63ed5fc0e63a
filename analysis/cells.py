"""Clustering and trajectories on any cell embedding, the scanpy way, with figures and scores.

Each function reads an embedding from ``obsm[use_rep]``: ``X_atlasformer`` (``atlasformer embed``),
``X_atlasformer_integrated`` (``atlasformer finetune integration``), an scVI latent, or ``X_pca``, which is
computed from the counts when absent (normalize_total, log1p, 2,000 HVGs, 50 PCs: the BENCHMARKS.md recipe).

:func:`cluster` and :func:`trajectory` write into ``adata`` the keys scanpy's own functions write (listed in
their docstrings) and return None, or, with ``copy=True``, leave ``adata`` as it is and return an annotated
copy. Figures are matplotlib ``Figure`` objects built without pyplot (see ``atlasformer.finetune.plots``),
saved atomically when given a path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import anndata as ad
import numpy as np
import pandas as pd

from atlasformer.finetune.common import read_counts
from atlasformer.finetune.integration import highly_variable, log_normalised_pcs
from atlasformer.finetune.plots import new_figure, save_figure
from atlasformer.tokenization import InputError
from atlasformer.tokenization.anndata_io import check_obs_key

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

RootRule = Literal["farthest", "first_component"]

WRITERS = {
    "X_atlasformer": "`atlasformer embed` (atlasformer.embed)",
    "X_atlasformer_integrated": "`atlasformer finetune integration` (atlasformer.finetune.integrate)",
}
"""The commands that write the embeddings users cluster most, named when one is missing."""


# ------------------------------------------------------------------ clustering
def cluster(adata: ad.AnnData, *, use_rep: str, n_neighbors: int = 15, resolution: float = 1.0,
            key_added: str = "leiden", seed: int = 0, umap: bool = True, layer: str | None = None,
            copy: bool = False) -> ad.AnnData | None:
    """Leiden clusters (and a UMAP) of the cells on the embedding ``obsm[use_rep]``.

    Runs ``sc.pp.neighbors`` on ``obsm[use_rep]``, ``sc.tl.leiden`` (igraph's implementation, as scanpy
    recommends; leidenalg where igraph is missing) and ``sc.tl.umap``.

    Parameters
    ----------
    adata
        Cells with the embedding in ``obsm[use_rep]``, or raw counts (``X`` or ``layers[layer]``) when
        ``use_rep="X_pca"`` is to be computed.
    use_rep
        The ``obsm`` key of the embedding. ``"X_pca"``, when absent, is computed from the counts on a copy
        (normalize_total to 1e4, log1p, 2,000 HVGs by scanpy's "seurat" flavour, 50 PCs) and written.
    n_neighbors
        Neighbours per cell in the kNN graph.
    resolution
        Leiden resolution: higher gives more, smaller clusters.
    key_added
        The ``obs`` column of the clusters.
    seed
        Seed of the neighbour search, Leiden and UMAP: the same seed gives the same clusters.
    umap
        Also compute the UMAP that :func:`plot_clusters` draws.
    layer
        Where the counts are, for a computed ``X_pca`` (default ``X``).
    copy
        Return an annotated copy and leave ``adata`` untouched, instead of writing into ``adata``.

    Returns
    -------
    The annotated copy with ``copy=True``, else None. Writes ``obs[key_added]`` (categorical, "0", "1",
    ...), ``uns[key_added]['params']``, ``obsp['connectivities']``, ``obsp['distances']``,
    ``uns['neighbors']``, and with ``umap`` ``obsm['X_umap']`` and ``uns['umap']``; ``obsm['X_pca']`` and
    ``uns['pca']`` when PCA was computed here.
    """
    check_representation(adata, use_rep)
    target = adata.copy() if copy else adata
    neighbors(target, use_rep=use_rep, n_neighbors=n_neighbors, seed=seed, layer=layer)
    leiden(target, resolution=resolution, key_added=key_added, seed=seed)
    if umap:
        _umap(target, seed)
    return target if copy else None


def neighbors(adata: ad.AnnData, *, use_rep: str, n_neighbors: int = 15, seed: int = 0,
              layer: str | None = None) -> None:
    """``sc.pp.neighbors`` on ``obsm[use_rep]`` in place, computing ``X_pca`` first when it is asked for and absent."""
    import scanpy as sc

    ensure_representation(adata, use_rep, layer=layer, seed=seed)
    if adata.n_obs <= n_neighbors:
        raise InputError(f"{adata.n_obs} cells: a neighbour graph with n_neighbors={n_neighbors} needs more cells "
                         "than that; pass a smaller n_neighbors.")
    sc.pp.neighbors(adata, use_rep=use_rep, n_neighbors=n_neighbors, random_state=seed,
                    transformer=knn_transformer(adata.n_obs, n_neighbors, seed))


def knn_transformer(n_obs: int, n_neighbors: int, seed: int):
    """The kNN search scanpy itself would choose, returning a scipy ``csr_matrix``.

    Below 8,192 cells: None (scanpy's exact search). Above: pynndescent with scanpy's (UMAP's) settings,
    its output converted, because scanpy 1.11 calls ``getnnz`` on it, which the sparse *arrays* pynndescent
    returns lack from scipy 1.15 on (sc.pp.neighbors fails on large data without this).
    """
    if n_obs < 8192:
        return None
    import scipy.sparse as sp
    from pynndescent import PyNNDescentTransformer

    class MatrixOutput(PyNNDescentTransformer):
        def fit_transform(self, X, y=None, **fit_params):
            return sp.csr_matrix(super().fit_transform(X, y, **fit_params))

    return MatrixOutput(n_neighbors=n_neighbors, metric="euclidean", random_state=seed,
                        n_trees=min(64, 5 + round(n_obs ** 0.5 / 20.0)), n_iters=max(5, round(np.log2(n_obs))))


def leiden(adata: ad.AnnData, *, resolution: float = 1.0, key_added: str = "leiden", seed: int = 0) -> None:
    """``sc.tl.leiden`` in place on the neighbour graph, with igraph's implementation when it is installed."""
    import importlib.util

    import scanpy as sc

    if importlib.util.find_spec("igraph") is not None:
        sc.tl.leiden(adata, resolution=resolution, key_added=key_added, random_state=seed, flavor="igraph",
                     n_iterations=2, directed=False)
    elif importlib.util.find_spec("leidenalg") is not None:
        sc.tl.leiden(adata, resolution=resolution, key_added=key_added, random_state=seed)
    else:
        raise InputError("Leiden clustering needs igraph or leidenalg: pip install igraph.")


def _umap(adata: ad.AnnData, seed: int) -> None:
    import scanpy as sc

    sc.tl.umap(adata, random_state=seed)


def check_representation(adata: ad.AnnData, use_rep: str) -> None:
    """Refuse a missing ``obsm[use_rep]`` (``X_pca`` can be computed), naming the command that writes it."""
    if use_rep in adata.obsm or use_rep == "X_pca":
        return
    writer = WRITERS.get(use_rep)
    hint = f"{writer} writes {use_rep}" if writer else "; ".join(f"{v} writes {k}" for k, v in WRITERS.items())
    raise InputError(f"obsm[{use_rep!r}] not found (obsm holds {sorted(adata.obsm)}): {hint}; or pass "
                     "use_rep='X_pca' (--use-rep X_pca) to compute PCA from the counts.")


def ensure_representation(adata: ad.AnnData, use_rep: str, *, layer: str | None = None, seed: int = 0) -> None:
    """Check that ``obsm[use_rep]`` exists; compute and write ``obsm['X_pca']`` when that is the one asked for."""
    check_representation(adata, use_rep)
    if use_rep in adata.obsm:
        return
    counts = read_counts(adata, layer=layer, source="data")  # checked raw counts; normalised on this copy
    n_comps = min(50, adata.n_obs - 1, adata.n_vars - 1)
    adata.obsm["X_pca"] = log_normalised_pcs(counts, highly_variable(counts), n_comps=n_comps, seed=seed)
    adata.uns["pca"] = {"params": {"recipe": "normalize_total(1e4), log1p, 2000 HVGs (seurat), PCA",
                                   "n_comps": int(adata.obsm["X_pca"].shape[1]), "layer": layer, "seed": seed}}


# ------------------------------------------------------------------ trajectories
def trajectory(adata: ad.AnnData, *, use_rep: str, root_cell: str | int | None = None, root_label: str | None = None,
               groups_key: str = "leiden", root_key: str | None = None, root_rule: RootRule = "farthest",
               n_neighbors: int = 15, n_dcs: int = 10,
               resolution: float = 1.0, seed: int = 0, umap: bool = True, layer: str | None = None,
               copy: bool = False) -> ad.AnnData | None:
    """Diffusion pseudotime from a root, and PAGA's graph of the groups, on the embedding ``obsm[use_rep]``.

    Runs ``sc.pp.neighbors`` on ``obsm[use_rep]``, ``sc.tl.diffmap``, ``sc.tl.paga`` on ``obs[groups_key]``
    and ``sc.tl.dpt`` from the root cell, and ``sc.tl.umap`` for :func:`plot_trajectory`.

    The root is ``root_cell``, or a cell of the label ``root_label`` chosen by ``root_rule``:

    - ``"first_component"``, what scanpy users usually do: the cell of that label at the extreme of the
      first non-trivial diffusion component (``X_diffmap[:, 1]``; column 0 is the stationary one). A
      component's sign is arbitrary, so the extreme taken is the one on the side away from the other
      cells (the minimum when the label's cells lie below the rest on average, else the maximum).
    - ``"farthest"`` (default): the cell of that label farthest from the centroid of the other cells in
      diffusion space (the first ``n_dcs`` non-trivial components, each scaled by its eigenvalue): the
      same idea using every component. On a branching trajectory the first component often separates
      the branches and leaves the trunk in the middle, so its extreme is the trunk's end at the branch
      point. On the benchmark's simulated trajectory (trunk from time 0 to 0.3) the first-component rule
      picked cells at true time 0.26-0.30 on PCA, scVI and a pretrained model's embedding, this rule
      0.02-0.15 (benchmarks/results/cluster_trajectory.md); it is nearer the start, not always at it.

    Cells the neighbour graph does not connect to the root get an infinite pseudotime.

    Parameters
    ----------
    adata
        Cells with the embedding in ``obsm[use_rep]`` (or counts, for ``use_rep="X_pca"``; see :func:`cluster`).
    use_rep
        The ``obsm`` key of the embedding; ``"X_pca"`` is computed from the counts when absent.
    root_cell
        The root: an ``obs_names`` entry, or a position (int). Give this or ``root_label``.
    root_label
        A label of ``obs[root_key]`` whose extreme cell (see above) is the root.
    groups_key
        The ``obs`` column of the groups PAGA connects. When absent and named ``"leiden"`` (the default),
        Leiden clusters at ``resolution`` are computed and written there; another absent name is an error.
    root_key
        The ``obs`` column holding ``root_label`` (default ``groups_key``), e.g. an annotated cell type.
    root_rule
        How the root cell of ``root_label`` is chosen: ``"farthest"`` or ``"first_component"`` (above).
    n_neighbors
        Neighbours per cell in the kNN graph.
    n_dcs
        Diffusion components DPT uses.
    resolution
        Leiden resolution, when the groups are computed here.
    seed
        Seed of the neighbour search, Leiden and UMAP.
    umap
        Also compute the UMAP that :func:`plot_trajectory` draws.
    layer
        Where the counts are, for a computed ``X_pca``.
    copy
        Return an annotated copy and leave ``adata`` untouched, instead of writing into ``adata``.

    Returns
    -------
    The annotated copy with ``copy=True``, else None. Writes ``obs['dpt_pseudotime']``, ``uns['iroot']``
    (the root's position), ``uns['trajectory']['params']`` (the root's name and how it was chosen),
    ``obsm['X_diffmap']``, ``uns['diffmap_evals']``, ``uns['paga']``, ``uns[f'{groups_key}_sizes']``,
    ``obsp['connectivities']``, ``obsp['distances']``, ``uns['neighbors']``, with ``umap``
    ``obsm['X_umap']`` and ``uns['umap']``; computed groups in ``obs[groups_key]`` (an existing column that
    is not categorical is made categorical, as PAGA needs); ``obsm['X_pca']`` when PCA was computed here.
    """
    import scanpy as sc

    if (root_cell is None) == (root_label is None):
        raise InputError("trajectory needs exactly one root: root_cell=<obs name or position> or "
                         "root_label=<a label of obs[root_key]>.")
    if root_rule not in ("farthest", "first_component"):
        raise InputError(f"root_rule={root_rule!r}: use 'farthest' or 'first_component'.")
    root_key = root_key or groups_key
    # bad keys and roots fail before any work (groups named "leiden" may be computed below)
    check_representation(adata, use_rep)
    if groups_key != "leiden":
        check_obs_key(adata.obs, groups_key, source="data", what="groups_key")
    if root_label is not None and root_key != groups_key:
        check_obs_key(adata.obs, root_key, source="data", what="root_key")
    if root_cell is not None:
        root_position(adata, root_cell)
    target = adata.copy() if copy else adata
    neighbors(target, use_rep=use_rep, n_neighbors=n_neighbors, seed=seed, layer=layer)
    ensure_groups(target, groups_key, resolution=resolution, seed=seed)
    sc.tl.diffmap(target, n_comps=min(max(15, n_dcs + 1), target.n_obs - 2))
    sc.tl.paga(target, groups=groups_key)
    iroot = (root_position(target, root_cell) if root_cell is not None else
             root_of_label(target, root_label, root_key, root_rule, n_dcs))
    target.uns["iroot"] = iroot
    sc.tl.dpt(target, n_dcs=min(n_dcs, target.obsm["X_diffmap"].shape[1]))
    target.uns["trajectory"] = {"params": {
        "use_rep": use_rep, "groups_key": groups_key, "root_cell": str(target.obs_names[iroot]),
        "root_label": root_label, "root_key": root_key if root_label is not None else None,
        "root_rule": "root_cell" if root_cell is not None else root_rule}}
    if umap:
        _umap(target, seed)
    return target if copy else None


def ensure_groups(adata: ad.AnnData, groups_key: str, *, resolution: float, seed: int) -> None:
    """Make ``obs[groups_key]`` categorical, computing Leiden clusters there when it is absent and named leiden."""
    if groups_key not in adata.obs:
        leiden(adata, resolution=resolution, key_added=groups_key, seed=seed)
    elif not isinstance(adata.obs[groups_key].dtype, pd.CategoricalDtype):
        adata.obs[groups_key] = pd.Categorical(adata.obs[groups_key].astype(str))


def root_position(adata: ad.AnnData, root_cell: str | int) -> int:
    """The position of ``root_cell`` (an obs name, or a position) in ``adata``; a clear error when absent."""
    if isinstance(root_cell, (int, np.integer)):
        if not -adata.n_obs <= root_cell < adata.n_obs:
            raise InputError(f"root_cell={root_cell} is not a cell position: the data holds {adata.n_obs} cells.")
        return int(root_cell) % adata.n_obs
    if root_cell not in adata.obs_names:
        raise InputError(f"root_cell={root_cell!r} is not in obs_names (e.g. {list(adata.obs_names[:3])}); pass the "
                         "name of a cell of this data, or root_label= to pick the root from a label.")
    return int(adata.obs_names.get_loc(root_cell))


def root_of_label(adata: ad.AnnData, root_label: str, root_key: str, rule: RootRule = "farthest",
                  n_dcs: int = 10) -> int:
    """The position of the root cell of ``root_label`` in ``obs[root_key]``, by ``rule`` (see :func:`trajectory`)."""
    labels = adata.obs[root_key].astype(str).to_numpy()
    in_label = labels == str(root_label)
    if not in_label.any():
        present = sorted(set(labels))
        raise InputError(f"root_label={root_label!r} is not a label of obs[{root_key!r}]; its labels: "
                         f"{present[:20]}{' ...' if len(present) > 20 else ''}.")
    rest = ~in_label if (~in_label).any() else np.ones_like(in_label)
    candidates = np.flatnonzero(in_label)
    if rule == "first_component":
        component = adata.obsm["X_diffmap"][:, 1]  # (cells,) column 0 is the stationary one
        below_the_rest = component[in_label].mean() < component[rest].mean()
        pick = np.argmin(component[candidates]) if below_the_rest else np.argmax(component[candidates])
        return int(candidates[pick])
    dims = slice(1, 1 + n_dcs)
    coords = adata.obsm["X_diffmap"][:, dims] * adata.uns["diffmap_evals"][dims]  # (cells, n_dcs) diffusion space
    distance = np.linalg.norm(coords[candidates] - coords[rest].mean(0), axis=1)
    return int(candidates[np.argmax(distance)])


# ------------------------------------------------------------------ scores
def cluster_scores(adata: ad.AnnData, *, labels_key: str, key: str = "leiden") -> dict[str, float]:
    """Agreement of the clusters ``obs[key]`` with the labels ``obs[labels_key]``.

    Cells without a label (NaN, or the string "nan") are left out.

    Returns
    -------
    ``{"ari": adjusted Rand index, "nmi": normalised mutual information}`` (scikit-learn; 1 is perfect
    agreement, about 0 a chance one).
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    check_obs_key(adata.obs, labels_key, source="data")
    if key not in adata.obs:
        raise InputError(f"obs[{key!r}] not found: run atlasformer.analysis.cluster(adata, use_rep=..., "
                         f"key_added={key!r}) first, or pass key=<the obs column of your clusters>.")
    labels = adata.obs[labels_key]
    known = (pd.notna(labels) & (labels.astype(str) != "nan")).to_numpy()
    truth, found = labels.astype(str).to_numpy()[known], adata.obs[key].astype(str).to_numpy()[known]
    return {"ari": float(adjusted_rand_score(truth, found)), "nmi": float(normalized_mutual_info_score(truth, found))}


# ------------------------------------------------------------------ figures
def plot_clusters(adata: ad.AnnData, path: str | os.PathLike | None = None, *, key: str = "leiden",
                  color: Sequence[str] = (), basis: str = "X_umap", title: str | None = None) -> Figure:
    """The cells on ``obsm[basis]`` coloured by their clusters, and by each extra ``obs`` column of ``color``.

    Parameters
    ----------
    adata
        Clustered cells (:func:`cluster` writes ``obs['leiden']`` and ``obsm['X_umap']``).
    path
        Where to save the PNG (written to a temporary file beside it, then renamed); not saved when None.
    key
        The ``obs`` column of the clusters.
    color
        More ``obs`` columns, one panel each (e.g. the annotated cell types).
    basis
        The 2-D ``obsm`` key to draw on.
    title
        Prefix of the panel titles (e.g. the embedding's name).

    Returns
    -------
    Figure
        One axes per panel.
    """
    columns = [key, *color]
    for column in columns:
        check_obs_key(adata.obs, column, source="data", what="key" if column == key else "color")
    xy = basis_coordinates(adata, basis)
    fig = new_figure(5.0 * len(columns), 4.3)
    for ax, column in zip(fig.subplots(1, len(columns), squeeze=False)[0], columns):
        scatter(ax, xy, adata.obs[column])
        ax.set_title(f"{title}: {column}" if title else column, fontsize=9)
    return save_figure(fig, path)


def plot_trajectory(adata: ad.AnnData, path: str | os.PathLike | None = None, *, groups_key: str = "leiden",
                    pseudotime_key: str = "dpt_pseudotime", color: Sequence[str] = (), basis: str = "X_umap",
                    title: str | None = None, min_edge: float = 0.05) -> Figure:
    """Pseudotime with its root, and PAGA's graph of the groups, on ``obsm[basis]``; one more panel per
    ``color`` column (e.g. a known time).

    Parameters
    ----------
    adata
        Cells after :func:`trajectory` (``obs['dpt_pseudotime']``, ``uns['iroot']``, ``uns['paga']``, ``X_umap``).
    path
        Where to save the PNG (written to a temporary file beside it, then renamed); not saved when None.
    groups_key
        The ``obs`` column PAGA connected.
    pseudotime_key
        The ``obs`` column of the pseudotime.
    color
        More ``obs`` columns, one panel each.
    basis
        The 2-D ``obsm`` key to draw on.
    title
        Prefix of the panel titles.
    min_edge
        PAGA connectivities below this are not drawn.

    Returns
    -------
    Figure
        One axes per panel.
    """
    for column, what in ((groups_key, "groups_key"), (pseudotime_key, "pseudotime_key"), *((c, "color") for c in color)):
        if column not in adata.obs:
            raise InputError(f"obs[{column!r}] not found ({what}): run atlasformer.analysis.trajectory(adata, ...) "
                             "first, or name an existing obs column.")
    if "paga" not in adata.uns:
        raise InputError("uns['paga'] not found: run atlasformer.analysis.trajectory(adata, ...) first.")
    xy = basis_coordinates(adata, basis)
    prefix = f"{title}: " if title else ""
    fig = new_figure(5.0 * (2 + len(color)), 4.3)
    axes = fig.subplots(1, 2 + len(color), squeeze=False)[0]
    scatter(axes[0], xy, adata.obs[pseudotime_key])
    if "iroot" in adata.uns:
        root = xy[int(adata.uns["iroot"])]
        axes[0].scatter(*root, marker="*", s=250, color="red", edgecolor="black", zorder=3, label="root")
        axes[0].legend(fontsize=7, loc="best")
    axes[0].set_title(f"{prefix}{pseudotime_key}", fontsize=9)
    scatter(axes[1], xy, adata.obs[groups_key], alpha=0.35)
    draw_paga(axes[1], xy, adata.obs[groups_key], adata.uns["paga"]["connectivities"], min_edge)
    axes[1].set_title(f"{prefix}PAGA on {groups_key}", fontsize=9)
    for ax, column in zip(axes[2:], color):
        scatter(ax, xy, adata.obs[column])
        ax.set_title(f"{prefix}{column}", fontsize=9)
    return save_figure(fig, path)


def basis_coordinates(adata: ad.AnnData, basis: str) -> np.ndarray:
    """(cells, 2) coordinates from ``obsm[basis]``; a clear error when they are missing."""
    if basis not in adata.obsm:
        raise InputError(f"obsm[{basis!r}] not found: cluster() and trajectory() compute X_umap (umap=True), or run "
                         "sc.tl.umap(adata); or pass basis=<a 2-D obsm key>.")
    return np.asarray(adata.obsm[basis])[:, :2]


def scatter(ax: Axes, xy: np.ndarray, values: pd.Series, alpha: float = 0.8) -> None:
    """Cells coloured by ``values``: a legend for labels, a colour bar for numbers (non-finite ones in grey)."""
    size = float(np.clip(20_000 / max(len(xy), 1), 1.0, 20.0))
    ax.set_xticks([])
    ax.set_yticks([])
    if pd.api.types.is_numeric_dtype(values) and not isinstance(values.dtype, pd.CategoricalDtype):
        numbers = values.to_numpy(dtype=float)
        finite = np.isfinite(numbers)
        ax.scatter(*xy[~finite].T, s=size, color="lightgrey", linewidths=0)
        points = ax.scatter(*xy[finite].T, c=numbers[finite], s=size, cmap="viridis", linewidths=0, alpha=alpha)
        ax.figure.colorbar(points, ax=ax, fraction=0.046, pad=0.02)
        return
    categorical = isinstance(values.dtype, pd.CategoricalDtype)  # keeps its order: Leiden's "0", "1", ..., "10"
    labels = (pd.Categorical(values) if categorical else pd.Categorical(values.astype(str))).remove_unused_categories()
    for i, label in enumerate(labels.categories):
        at = labels.codes == i
        ax.scatter(*xy[at].T, s=size, color=f"C{i % 10}" if len(labels.categories) <= 10 else _tab20(i),
                   linewidths=0, alpha=alpha, label=label)
    ax.legend(fontsize=6, markerscale=max(1.0, 6 / size ** 0.5), loc="center left", bbox_to_anchor=(1.0, 0.5),
              frameon=False, ncol=1 + len(labels.categories) // 20)


def _tab20(i: int):
    from matplotlib import colormaps

    return colormaps["tab20"](i % 20)


def draw_paga(ax: Axes, xy: np.ndarray, groups: pd.Series, connectivities, min_edge: float) -> None:
    """PAGA's graph over the groups: a node at each group's median position, edges as wide as their weight."""
    labels = pd.Categorical(groups)  # PAGA's rows follow the categories' order
    codes = np.asarray(labels.codes)
    centres = np.stack([np.median(xy[codes == i], axis=0) if (codes == i).any() else np.full(2, np.nan)
                        for i in range(len(labels.categories))])  # (groups, 2)
    weights = np.asarray(connectivities.todense() if hasattr(connectivities, "todense") else connectivities)
    for i, j in zip(*np.nonzero(np.triu(weights, 1) >= min_edge)):
        ax.plot(*centres[[i, j]].T, color="black", linewidth=0.5 + 4 * weights[i, j], alpha=0.8, zorder=2)
    ax.scatter(*centres.T, s=80, color="white", edgecolor="black", zorder=3)
    for name, (x, y) in zip(labels.categories, centres):
        ax.annotate(name, (x, y), fontsize=7, ha="center", va="center", zorder=4)
