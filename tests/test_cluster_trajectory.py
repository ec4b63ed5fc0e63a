"""Clustering and trajectories on an embedding (atlasformer.analysis.cells), and the trajectory simulator.

Floors were measured on these tiny simulations over seeds 0-4 (the tests use seed 0): Leiden on PCA recovered
the 3 cell types exactly (ARI and NMI 1.0 on every seed), so the floor 0.9 only leaves room for library
changes; DPT from the earliest cell gave Spearman 0.79-0.96 with the true time (0.93 at seed 0), so the floor
is 0.85; the root of the label "trunk" had true time 0.003-0.29 (0.08 at seed 0; the trunk spans 0-0.3).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from scipy.stats import spearmanr

from atlasformer.analysis.cells import cluster, cluster_scores, plot_clusters, plot_trajectory, trajectory
from atlasformer.tokenization import InputError, simulate_counts
from atlasformer.tokenization.simulate import simulate_trajectory

ARI_FLOOR = 0.9
SPEARMAN_FLOOR = 0.85


@pytest.fixture(scope="module")
def typed():
    """300 cells of 3 cell types, one batch, raw counts only."""
    return simulate_counts(n_cells=300, n_genes=200, n_cell_types=3, n_batches=1, seed=0)


@pytest.fixture(scope="module")
def branching():
    """400 cells along a trunk and two branches, raw counts only."""
    return simulate_trajectory(400, 200, n_branches=2, seed=0)


@pytest.fixture(scope="module")
def traced(branching):
    """The trajectory from the earliest cell, on PCA computed from the counts."""
    return trajectory(branching, use_rep="X_pca", root_cell=int(np.argmin(branching.obs["true_time"])), copy=True)


def pseudotime_spearman(adata) -> float:
    pseudotime = adata.obs["dpt_pseudotime"].to_numpy()
    finite = np.isfinite(pseudotime)
    assert finite.mean() > 0.95  # the graph connects (almost) every cell to the root
    return float(spearmanr(pseudotime[finite], adata.obs["true_time"].to_numpy()[finite]).statistic)


# ------------------------------------------------------------------ the simulator
def test_simulated_trajectory_has_a_trunk_then_branches_with_known_time():
    adata = simulate_trajectory(600, 120, n_branches=3, branch_time=0.4, seed=1)
    time, branch = adata.obs["true_time"].to_numpy(), adata.obs["branch"].astype(str).to_numpy()
    assert ((time >= 0) & (time <= 1)).all()
    assert set(branch) == {"trunk", "branch_0", "branch_1", "branch_2"}
    assert (branch[time < 0.4] == "trunk").all() and (branch[time >= 0.4] != "trunk").all()
    x = adata.X.toarray()
    assert (x >= 0).all() and np.array_equal(x, np.round(x))
    assert np.array_equal(simulate_trajectory(600, 120, n_branches=3, branch_time=0.4, seed=1).X.toarray(), x)
    assert set(adata.var["program"].astype(str)) == {"none", "shared", "branch_0", "branch_1", "branch_2"}


def test_simulated_branches_diverge_only_after_the_branch_point():
    adata = simulate_trajectory(3000, 200, n_branches=2, branch_time=0.3, seed=0)
    time, branch = adata.obs["true_time"].to_numpy(), adata.obs["branch"].astype(str).to_numpy()
    x = adata.X.toarray()
    x = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    own = (adata.var["program"] == "branch_0").to_numpy()  # genes of branch 0's programs

    def gap(lo, hi):  # mean |difference| of the branches' expression of those genes, over a time window
        window = (time >= lo) & (time < hi)
        return np.abs(x[window & (branch == "branch_0")][:, own].mean(0) - x[window & (branch == "branch_1")][:, own].mean(0)).mean()

    # continuous at the branch point (what is left there is sampling noise of ~40 cells a side), apart at the end
    assert gap(0.3, 0.33) < 0.3 * gap(0.8, 1.0) and gap(0.8, 1.0) > 0.5


def test_simulate_trajectory_refuses_bad_settings():
    with pytest.raises(InputError, match="at least one branch"):
        simulate_trajectory(10, 10, n_branches=0)
    with pytest.raises(InputError, match="branch_time"):
        simulate_trajectory(10, 10, branch_time=1.0)


# ------------------------------------------------------------------ clustering
def test_clustering_recovers_the_simulated_cell_types_and_leaves_the_input_untouched(typed):
    before = typed.copy()
    clustered = cluster(typed, use_rep="X_pca", copy=True)
    assert cluster_scores(clustered, labels_key="cell_type")["ari"] >= ARI_FLOOR
    assert cluster_scores(clustered, labels_key="cell_type")["nmi"] >= ARI_FLOOR
    for key, slot in (("leiden", "obs"), ("connectivities", "obsp"), ("distances", "obsp"), ("neighbors", "uns"),
                      ("X_umap", "obsm"), ("X_pca", "obsm")):
        assert key in getattr(clustered, slot), (slot, key)
    assert clustered.obsm["X_pca"].shape == (300, 50) and clustered.obsm["X_umap"].shape == (300, 2)
    # copy=True: the input gained nothing and its counts are still raw
    assert not typed.obsm and not typed.obsp and "leiden" not in typed.obs
    assert (typed.X != before.X).nnz == 0


def test_clustering_writes_into_adata_and_is_seeded(typed):
    adata = typed.copy()
    assert cluster(adata, use_rep="X_pca", umap=False, key_added="clusters") is None
    again = cluster(typed, use_rep="X_pca", umap=False, key_added="clusters", copy=True)
    assert adata.obs["clusters"].equals(again.obs["clusters"]) and "X_umap" not in adata.obsm
    finer = cluster(typed, use_rep="X_pca", umap=False, resolution=3.0, copy=True)
    assert finer.obs["leiden"].nunique() > adata.obs["clusters"].nunique()


def test_cluster_scores_measure_agreement(typed):
    adata = typed.copy()
    adata.obs["same"] = adata.obs["cell_type"].astype(str)
    adata.obs["one"] = "a"
    assert cluster_scores(adata, labels_key="cell_type", key="same") == pytest.approx({"ari": 1.0, "nmi": 1.0})
    assert cluster_scores(adata, labels_key="cell_type", key="one") == pytest.approx({"ari": 0.0, "nmi": 0.0})
    adata.obs.loc[adata.obs_names[:100], "cell_type"] = np.nan  # unlabelled cells are left out
    adata.obs.loc[adata.obs_names[:100], "same"] = "wrong"
    assert cluster_scores(adata, labels_key="cell_type", key="same")["ari"] == pytest.approx(1.0)
    with pytest.raises(InputError, match="run atlasformer.analysis.cluster"):
        cluster_scores(adata, labels_key="cell_type", key="leiden")
    with pytest.raises(InputError, match="labels_key='celltype'"):
        cluster_scores(adata, labels_key="celltype", key="same")


def test_a_missing_embedding_names_the_command_that_writes_it(typed):
    with pytest.raises(InputError, match="`atlasformer embed`.* writes X_atlasformer;.*X_pca"):
        cluster(typed, use_rep="X_atlasformer", copy=True)
    with pytest.raises(InputError, match="`atlasformer finetune integration`.*X_atlasformer_integrated"):
        trajectory(typed, use_rep="X_atlasformer_integrated", root_cell=0, copy=True)
    with pytest.raises(InputError, match="obsm\\['X_scvi'\\] not found.*atlasformer embed"):
        cluster(typed, use_rep="X_scvi", copy=True)


def test_any_embedding_in_obsm_is_used_as_it_is(typed):
    adata = typed.copy()
    types = adata.obs["cell_type"].cat.codes.to_numpy()
    rng = np.random.default_rng(0)
    adata.obsm["X_mine"] = (np.eye(3)[types] * 10 + rng.normal(0, 0.5, (300, 3))).astype(np.float32)
    clustered = cluster(adata, use_rep="X_mine", umap=False, copy=True)
    # three far-apart blobs: Leiden may split a blob (it has no inner structure) but never joins two
    crossed = clustered.obs.groupby("leiden", observed=True)["cell_type"].nunique()
    assert (crossed == 1).all() and clustered.obs["leiden"].nunique() >= 3
    assert "X_pca" not in clustered.obsm and clustered.uns["neighbors"]["params"]["use_rep"] == "X_mine"


# ------------------------------------------------------------------ trajectories
def test_pseudotime_follows_the_true_time(traced, tmp_path):
    assert pseudotime_spearman(traced) >= SPEARMAN_FLOOR
    assert traced.obs["dpt_pseudotime"].iloc[traced.uns["iroot"]] == 0.0
    for key, slot in (("paga", "uns"), ("X_diffmap", "obsm"), ("leiden", "obs"), ("X_umap", "obsm"),
                      ("leiden_sizes", "uns"), ("trajectory", "uns")):
        assert key in getattr(traced, slot), (slot, key)
    groups = traced.obs["leiden"].nunique()
    assert traced.uns["paga"]["connectivities"].shape == (groups, groups)
    traced.write_h5ad(tmp_path / "traced.h5ad")  # every written key can be saved
    assert ad.read_h5ad(tmp_path / "traced.h5ad").uns["trajectory"]["params"]["root_label"] is None


def test_root_label_starts_at_the_beginning_of_that_label(branching):
    """root_label: the trunk's cell farthest from the branches in diffusion space, near the trunk's start."""
    adata = branching.copy()
    trajectory(adata, use_rep="X_pca", root_label="trunk", root_key="branch", umap=False)
    root = adata.uns["iroot"]
    assert adata.obs["branch"].iloc[root] == "trunk" and adata.obs["true_time"].iloc[root] < 0.15
    assert adata.uns["trajectory"]["params"]["root_cell"] == adata.obs_names[root]
    assert pseudotime_spearman(adata) >= SPEARMAN_FLOOR
    # the label may name the groups themselves; the first-component rule picks a trunk cell too
    by_groups = trajectory(branching, use_rep="X_pca", root_label="trunk", groups_key="branch",
                           root_rule="first_component", umap=False, copy=True)
    assert by_groups.obs["branch"].iloc[by_groups.uns["iroot"]] == "trunk"
    assert by_groups.uns["paga"]["groups"] == "branch"
    earliest = int(np.argmin(branching.obs["true_time"]))
    by_name = trajectory(branching, use_rep="X_pca", root_cell=branching.obs_names[earliest], umap=False, copy=True)
    assert by_name.uns["iroot"] == earliest and by_name.uns["trajectory"]["params"]["root_rule"] == "root_cell"


def test_root_errors_name_the_problem(branching):
    with pytest.raises(InputError, match="root_label='stem' is not a label of obs\\['branch'\\].*trunk"):
        trajectory(branching, use_rep="X_pca", root_label="stem", groups_key="branch", umap=False, copy=True)
    with pytest.raises(InputError, match="root_cell='nope' is not in obs_names"):
        trajectory(branching, use_rep="X_pca", root_cell="nope", copy=True)
    with pytest.raises(InputError, match="root_cell=400 is not a cell position"):
        trajectory(branching, use_rep="X_pca", root_cell=400, copy=True)
    with pytest.raises(InputError, match="exactly one root"):
        trajectory(branching, use_rep="X_pca", copy=True)
    with pytest.raises(InputError, match="groups_key='clusters'"):
        trajectory(branching, use_rep="X_pca", root_cell=0, groups_key="clusters", copy=True)
    with pytest.raises(InputError, match="root_key='stage'"):
        trajectory(branching, use_rep="X_pca", root_label="trunk", root_key="stage", copy=True)
    with pytest.raises(InputError, match="root_rule='middle'"):
        trajectory(branching, use_rep="X_pca", root_label="trunk", root_key="branch", root_rule="middle", copy=True)
    assert not branching.obsm and "leiden" not in branching.obs  # nothing was written on the way


# ------------------------------------------------------------------ figures
def test_figures_are_written_as_png_with_no_temporary_file_left(traced, tmp_path):
    clusters = plot_clusters(traced, tmp_path / "figs" / "clusters.png", color=["branch"], title="PCA")
    assert len(clusters.axes) == 2 and clusters.axes[1].get_title() == "PCA: branch"
    path = tmp_path / "figs" / "trajectory.png"
    fig = plot_trajectory(traced, path, color=["true_time"])
    titles = [ax.get_title() for ax in fig.axes]  # the panels, then their colour bars (untitled)
    assert titles[:3] == ["dpt_pseudotime", "PAGA on leiden", "true_time"]
    for written in (tmp_path / "figs" / "clusters.png", path):
        assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and written.stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["clusters.png", "trajectory.png"]


def test_figures_need_their_keys(typed, tmp_path):
    with pytest.raises(InputError, match="obsm\\['X_umap'\\] not found"):
        plot_clusters(typed.copy(), tmp_path / "x.png", key="cell_type")
    with pytest.raises(InputError, match="run atlasformer.analysis.trajectory"):
        plot_trajectory(typed, tmp_path / "y.png", groups_key="cell_type")
    assert not list(tmp_path.iterdir())
