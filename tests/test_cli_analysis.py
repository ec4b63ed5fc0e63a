"""The analysis commands end to end through ``atlasformer.cli.main``: ``map``, ``index build|search``,
``genes embed|programs|network|perturb``, ``cluster`` and ``trajectory``, on tiny simulated files, with one tiny
model pretrained here for the whole module. Each test reads back what the command wrote and checks its content
against docs/formats.md (keys, columns, files) and against the simulation (labels, true time)."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from atlasformer.checkpoints import load_model_folder
from atlasformer.cli import main
from atlasformer.pretrain import PretrainConfig, train
from atlasformer.tokenization import TokenizerConfig, simulate_counts, simulate_trajectory

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """ref.h5ad (batches 0 and 1), query.h5ad (batch 2), traj.h5ad, and a tiny model pretrained on ref.h5ad
    (100 steps, ~5 s): 4 cell types, 300 genes."""
    folder = tmp_path_factory.mktemp("cli_analysis")
    cells = simulate_counts(n_cells=600, n_genes=300, n_cell_types=4, n_batches=3, seed=0)
    paths = {"folder": folder, "ref": folder / "ref.h5ad", "query": folder / "query.h5ad", "traj": folder / "traj.h5ad"}
    cells[cells.obs["batch"] != "batch_2"].copy().write_h5ad(paths["ref"])
    cells[cells.obs["batch"] == "batch_2"].copy().write_h5ad(paths["query"])
    simulate_trajectory(n_cells=400, n_genes=200, seed=0).write_h5ad(paths["traj"])
    cfg = PretrainConfig(
        data=(str(paths["ref"]),), output=str(folder / "run"),
        model={"d_model": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.0},
        tokenizer=TokenizerConfig(max_seq_len=64, n_bins=21, gene_id_mode="raw"), max_steps=100, batch_size=32,
        lr=3e-3, warmup_steps=10, eval_every=100, save_every=100, log_every=100, seed=0, threads=1, cpu=True)
    paths["model"] = Path(train(cfg))
    return paths


def run(*argv) -> int:
    return main([str(a) for a in argv])


# ----------------------------------------------------------------------------------------- map
def test_map_writes_the_labelled_query_its_figure_and_summary(files, tmp_path):
    out = tmp_path / "mapped"
    assert run("map", "--reference", files["ref"], "--query", files["query"], "--labels-key", "cell_type",
               "--batch-key", "batch", "--model", files["model"], "--output", out, "--cpu") == 0
    query = ad.read_h5ad(files["query"])
    mapped = ad.read_h5ad(out / "query.h5ad")
    assert mapped.X is None and list(mapped.obs_names) == list(query.obs_names)  # no --with-x
    truth = query.obs["cell_type"].astype(str).to_numpy()
    assert (mapped.obs["atlasformer_label_argmax"].astype(str).to_numpy() == truth).mean() >= 0.9
    assert (mapped.obs["atlasformer_label"].astype(str).to_numpy() == truth).mean() >= 0.8
    confidence = mapped.obs["atlasformer_confidence"].to_numpy()
    assert ((confidence >= 0) & (confidence <= 1)).all()
    np.testing.assert_allclose(mapped.obs["atlasformer_uncertainty"], 1 - confidence, atol=1e-6)
    assert (mapped.obs["atlasformer_neighbour_distance"] > 0).all()
    names = list(mapped.uns["atlasformer_label_probabilities_names"])
    assert names == sorted(set(truth))
    probabilities = mapped.obsm["atlasformer_label_probabilities"]
    assert probabilities.shape == (mapped.n_obs, len(names))
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-5)
    assert mapped.obsm["X_umap"].shape == (mapped.n_obs, 2) and np.isfinite(mapped.obsm["X_umap"]).all()
    assert mapped.obsm["X_atlasformer"].shape[0] == mapped.n_obs
    summary = mapped.uns["atlasformer_mapping"]
    assert summary["labels_key"] == "cell_type" and summary["folds"].endswith("batches in obs['batch']")
    assert mapped.uns["atlasformer"]["obs"]["atlasformer_label"]["model"] == str(files["model"])
    assert is_png(out / "mapping.png")
    written = json.loads((out / "mapping.json").read_text())
    assert sum(written["label_counts"].values()) == mapped.n_obs
    assert written["n_unknown"] == int((mapped.obs["atlasformer_label"] == "unknown").sum())
    settings = json.loads(mapped.uns["atlasformer"]["obs"]["atlasformer_label"]["settings"])
    assert settings["representation"] == "joint"  # the default with a model


def test_map_on_expression_needs_no_model_and_bad_keys_exit_2(files, tmp_path, capsys):
    out = tmp_path / "expression"
    assert run("map", "--reference", files["ref"], "--query", files["query"], "--labels-key", "cell_type",
               "--representation", "expression", "--output", out) == 0
    mapped = ad.read_h5ad(out / "query.h5ad")
    assert mapped.uns["atlasformer"]["obs"]["atlasformer_label"]["model"] == "none (expression PCs)"
    assert mapped.uns["atlasformer_mapping"]["folds"] == "5 random folds"  # no --batch-key
    capsys.readouterr()
    assert run("map", "--reference", files["ref"], "--query", files["query"], "--labels-key", "celltype",
               "--representation", "expression", "--output", tmp_path / "bad") == 2
    assert "celltype" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- index
def test_index_build_then_search_returns_k_ranked_neighbours_per_query_cell(files, tmp_path):
    index = tmp_path / "ref_index"
    assert run("index", "build", "--data", files["ref"], "--model", files["model"], "--obs-keys", "cell_type",
               "--output", index, "--cpu") == 0
    assert sorted(p.name for p in index.iterdir()) == ["index.faiss", "index.json", "obs.parquet"]
    manifest = json.loads((index / "index.json").read_text())
    n_ref = ad.read_h5ad(files["ref"]).n_obs
    assert manifest["format"] == "atlasformer-cell-index" and manifest["n_cells"] == n_ref
    assert manifest["dim"] == 32 and manifest["kind"] == "exact" and manifest["embedding_key"] == "X_atlasformer"
    assert manifest["provenance"]["model"] == str(files["model"].resolve())  # searchable from any directory
    assert list(pd.read_parquet(index / "obs.parquet").columns) == ["cell_type"]

    hits = tmp_path / "hits"
    assert run("index", "search", "--index", index, "--data", files["query"], "--k", 5, "--output", hits,
               "--cpu") == 0
    table = pd.read_csv(hits / "query_neighbours.csv")
    query = ad.read_h5ad(files["query"])
    assert list(table.columns) == ["query_cell", "rank", "reference_cell", "distance", "cell_type"]
    assert len(table) == 5 * query.n_obs and list(table["query_cell"].unique()) == list(query.obs_names)
    assert (table["rank"].to_numpy().reshape(-1, 5) == np.arange(1, 6)).all()  # nearest first, per query cell
    assert (table.groupby("query_cell")["distance"].apply(lambda d: d.is_monotonic_increasing)).all()
    reference = ad.read_h5ad(files["ref"])
    assert table["reference_cell"].isin(reference.obs_names).all()
    # the label column is the neighbour's own label
    assert (table["cell_type"].to_numpy() == reference.obs.loc[table["reference_cell"], "cell_type"].to_numpy()).all()


def pcs(adata: ad.AnnData, loadings: np.ndarray, centre: np.ndarray) -> np.ndarray:
    x = np.log1p(adata.X.toarray() / adata.X.sum(1).A * 1e4)
    return (x - centre) @ loadings


def test_index_on_a_stored_embedding_finds_cells_of_the_same_type(files, tmp_path):
    """--use-rep names an embedding the files already hold (here PCs fitted on the reference): no model runs."""
    reference, query = ad.read_h5ad(files["ref"]), ad.read_h5ad(files["query"])
    x = np.log1p(reference.X.toarray() / reference.X.sum(1).A * 1e4)
    centre = x.mean(0)
    loadings = np.linalg.svd(x - centre, full_matrices=False)[2][:20].T  # (genes, 20)
    for adata, name in ((reference, "ref_pcs.h5ad"), (query, "query_pcs.h5ad")):
        adata.obsm["X_pca"] = pcs(adata, loadings, centre)
        adata.write_h5ad(tmp_path / name)
    assert run("index", "build", "--data", tmp_path / "ref_pcs.h5ad", "--use-rep", "X_pca", "--output",
               tmp_path / "index") == 0
    assert run("index", "search", "--index", tmp_path / "index", "--data", tmp_path / "query_pcs.h5ad", "--use-rep",
               "X_pca", "--k", 10, "--output", tmp_path / "hits") == 0
    table = pd.read_csv(tmp_path / "hits" / "query_pcs_neighbours.csv")
    truth = query.obs.loc[table["query_cell"], "cell_type"].astype(str).to_numpy()
    assert (table["cell_type"].astype(str).to_numpy() == truth).mean() >= 0.9
    assert set(table.columns) >= {"cell_type", "batch"}  # every obs column without --obs-keys


def test_index_search_refuses_a_mismatched_embedding_and_a_corrupt_index(files, tmp_path, capsys):
    reference = ad.read_h5ad(files["ref"])
    reference.obsm["X_other"] = np.random.default_rng(0).normal(size=(reference.n_obs, 8)).astype(np.float32)
    reference.write_h5ad(tmp_path / "ref_other.h5ad")
    index = tmp_path / "index"
    assert run("index", "build", "--data", tmp_path / "ref_other.h5ad", "--use-rep", "X_other", "--output", index) == 0
    capsys.readouterr()

    assert run("index", "search", "--index", index, "--data", tmp_path / "ref_other.h5ad", "--output",
               tmp_path / "hits") == 2  # --use-rep left at X_atlasformer
    assert "--use-rep X_other" in capsys.readouterr().err
    assert run("index", "search", "--index", index, "--data", files["query"], "--use-rep", "X_other", "--output",
               tmp_path / "hits") == 2  # the query lacks that embedding and only X_atlasformer is computed
    assert "X_other" in capsys.readouterr().err

    parquet = index / "obs.parquet"
    parquet.write_bytes(parquet.read_bytes()[:-20] + b"\0" * 20)
    assert run("index", "search", "--index", index, "--data", tmp_path / "ref_other.h5ad", "--use-rep", "X_other",
               "--output", tmp_path / "hits") == 2
    assert "obs.parquet does not match its SHA-256" in capsys.readouterr().err
    assert not (tmp_path / "hits" / "ref_other_neighbours.csv").exists()


# ----------------------------------------------------------------------------------------- genes
def test_genes_embed_writes_the_gene_embeddings_of_formats_md(files, tmp_path):
    out = tmp_path / "genes"
    assert run("genes", "embed", "--model", files["model"], "--data", files["query"], "--corpus", files["ref"],
               "--output", out, "--cpu") == 0
    genes = ad.read_h5ad(out / "gene_embeddings.h5ad")
    model, tokenizer = load_model_folder(files["model"])
    assert list(genes.obs_names) == tokenizer.vocab.genes and genes.n_vars == 32
    assert (genes.obs["token_id"].to_numpy() == tokenizer.vocab.lookup(genes.obs_names)).all()
    table = model.backbone.embeddings.genes.weight.detach().numpy()
    np.testing.assert_allclose(genes.X, table[genes.obs["token_id"].to_numpy()], rtol=1e-6)
    assert {"symbol", "ensembl_id"} <= set(genes.obs) and genes.obs["seen_in_pretraining"].dtype == bool
    seen = genes.obs["seen_in_pretraining"].to_numpy()
    assert (seen == (genes.obs["pretraining_cells"].to_numpy() > 0)).all() and 0 < seen.sum() < genes.n_obs
    assert genes.uns["gene_embeddings"]["seen_from"] == "corpus"
    n_cells = genes.obs["n_cells_seen"].to_numpy()
    assert n_cells.max() <= ad.read_h5ad(files["query"]).n_obs
    context = genes.layers["context"]
    assert context.shape == genes.shape and (np.isnan(context).all(1) == (n_cells == 0)).all()

    assert run("genes", "embed", "--model", files["model"], "--output", tmp_path / "no_corpus", "--cpu") == 0
    alone = ad.read_h5ad(tmp_path / "no_corpus" / "gene_embeddings.h5ad")
    assert alone.uns["gene_embeddings"]["seen_from"] == "weights"  # a run from random weights records its schedule
    assert "context" not in alone.layers and "pretraining_cells" not in alone.obs


def test_genes_programs_write_programs_enrichment_and_cell_scores(files, tmp_path):
    genes = ad.read_h5ad(files["ref"]).var_names
    gmt = tmp_path / "sets.gmt"
    gmt.write_text(f"first\tten genes\t{chr(9).join(genes[:10])}\nsecond\t-\t{chr(9).join(genes[10:13])}\tNOT_A_GENE\n")
    out = tmp_path / "programs"
    assert run("genes", "programs", "--model", files["model"], "--data", files["query"], "--corpus", files["ref"],
               "--gene-sets", gmt, "--output", out, "--cpu") == 0
    embeddings = ad.read_h5ad(out / "gene_embeddings.h5ad")
    programs = pd.read_csv(out / "programs.csv", dtype={"program": str})
    assert list(programs.columns) == ["program", "n_genes", "gene_ids", "symbols"] and len(programs) >= 2
    members = programs["gene_ids"].str.split(",")
    assert (members.map(len) == programs["n_genes"]).all() and (programs["n_genes"] >= 5).all()
    flat = [g for m in members for g in m]
    assert len(flat) == len(set(flat))  # a gene is in one program at most
    assert embeddings.obs.loc[flat, "seen_in_pretraining"].all()  # unseen genes are in none
    assert programs["n_genes"].is_monotonic_decreasing

    enrichment = pd.read_csv(out / "enrichment.csv", index_col="set")
    assert list(enrichment.index) == ["first", "second"]
    assert enrichment.loc["first", "n_genes"] == 10 and enrichment.loc["second", "n_genes"] == 4
    assert enrichment.loc["first", "n_present"] == embeddings.obs.loc[genes[:10], "seen_in_pretraining"].sum()
    tested = enrichment["p_value"].dropna()
    assert len(tested) >= 1 and ((tested > 0) & (tested <= 1)).all()

    scored = ad.read_h5ad(out / "query.h5ad")
    columns = [f"program_{p}" for p in programs["program"]]
    assert set(columns) <= set(scored.obs) and np.isfinite(scored.obs[columns].to_numpy()).all()


def test_genes_programs_refuse_a_malformed_gene_set_file(files, tmp_path, capsys):
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("only_a_name\n")
    assert run("genes", "programs", "--model", files["model"], "--data", files["query"], "--gene-sets", gmt,
               "--output", tmp_path / "out", "--cpu") == 2
    assert "line 1" in capsys.readouterr().err


def test_genes_network_writes_the_top_attention_edges_of_each_group(files, tmp_path):
    out = tmp_path / "network"
    assert run("genes", "network", "--model", files["model"], "--data", files["query"], "--groupby", "cell_type",
               "--top-edges", 20, "--max-cells-per-group", 40, "--output", out, "--cpu") == 0
    edges = pd.read_csv(out / "attention_edges.csv")
    query = ad.read_h5ad(files["query"])
    assert list(edges.columns) == ["group", "source_gene", "target_gene", "weight", "n_cells"]
    assert set(edges["group"]) == set(query.obs["cell_type"].astype(str))
    assert (edges.groupby("group").size() == 20).all()
    assert (edges["source_gene"] != edges["target_gene"]).all()
    assert edges[["source_gene", "target_gene"]].isin(query.var_names).all().all()
    assert ((edges["weight"] > 0) & (edges["weight"] <= 1)).all() and (edges["n_cells"] >= 10).all()
    assert edges.groupby("group")["weight"].apply(lambda w: w.is_monotonic_decreasing).all()


def test_genes_perturb_writes_per_cell_and_ranked_effects(files, tmp_path):
    query = ad.read_h5ad(files["query"])
    first, second, third = query.var_names[:3]
    out = tmp_path / "perturb"
    assert run("genes", "perturb", "--model", files["model"], "--data", files["query"], "--genes", first,
               f"{second}+{third}", "--mode", "overexpress", "--cells", "cell_type=type_0", "--target",
               "cell_type=type_1", "--output", out, "--cpu") == 0
    per_cell = pd.read_csv(out / "perturbation_per_cell.csv")
    assert list(per_cell.columns) == ["perturbation", "cell", "n_expressed", "cosine_shift", "expression_shift",
                                      "target_shift"]
    type_0 = set(query.obs_names[query.obs["cell_type"] == "type_0"])
    for name in (first, f"{second}+{third}"):  # over-expression perturbs every chosen cell
        assert set(per_cell.loc[per_cell["perturbation"] == name, "cell"]) == type_0
    assert ((per_cell["cosine_shift"] >= -1e-6) & (per_cell["n_expressed"] <= 2)).all()
    ranked = pd.read_csv(out / "perturbation_ranked.csv")
    assert set(ranked["perturbation"]) == {first, f"{second}+{third}"}
    assert (ranked["n_cells"] == len(type_0)).all() and ranked["target_shift"].is_monotonic_decreasing
    mean = per_cell.groupby("perturbation")["target_shift"].mean()
    np.testing.assert_allclose(ranked.set_index("perturbation")["target_shift"], mean[ranked["perturbation"]],
                               rtol=1e-4, atol=1e-9)
    assert set(ranked["direction"]) <= {"toward", "away"}

    out = tmp_path / "delete"
    assert run("genes", "perturb", "--model", files["model"], "--data", files["query"], "--genes", first,
               "--output", out, "--cpu") == 0
    deleted = pd.read_csv(out / "perturbation_per_cell.csv")
    assert (deleted["n_expressed"] == 1).all() and "target_shift" not in deleted  # only cells holding the gene


# ----------------------------------------------------------------------------------------- cells
def test_cluster_writes_clusters_umap_figure_and_scores(files, tmp_path, capsys):
    out = tmp_path / "clusters"
    assert run("cluster", "--data", files["query"], "--use-rep", "X_pca", "--labels-key", "cell_type",
               "--output", out) == 0
    clustered = ad.read_h5ad(out / "query.h5ad")
    assert clustered.X is None and not clustered.layers  # counts stay in the input
    assert clustered.obs["leiden"].dtype == "category" and clustered.obsm["X_umap"].shape == (clustered.n_obs, 2)
    assert {"connectivities", "distances"} <= set(clustered.obsp) and "X_pca" in clustered.obsm
    summary = json.loads((out / "cluster.json").read_text())
    assert summary["n_clusters"] == clustered.obs["leiden"].nunique()
    assert summary["ari"] >= 0.8 and summary["nmi"] >= 0.8  # one batch: the 4 simulated types
    assert is_png(out / "clusters.png")
    capsys.readouterr()
    assert run("cluster", "--data", files["query"], "--use-rep", "X_atlasformer", "--output", tmp_path / "x") == 2
    assert "atlasformer embed" in capsys.readouterr().err


def test_trajectory_pseudotime_follows_the_simulated_time(files, tmp_path, capsys):
    out = tmp_path / "trajectory"
    assert run("trajectory", "--data", files["traj"], "--use-rep", "X_pca", "--root-label", "trunk", "--root-key",
               "branch", "--output", out) == 0
    traced = ad.read_h5ad(out / "traj.h5ad")
    assert traced.X is None and {"paga", "iroot", "diffmap_evals"} <= set(traced.uns)
    assert traced.obs.iloc[int(traced.uns["iroot"])]["branch"] == "trunk"
    assert spearmanr(traced.obs["true_time"], traced.obs["dpt_pseudotime"]).statistic >= 0.8
    summary = json.loads((out / "trajectory.json").read_text())
    assert summary["root_cell"] == traced.obs_names[int(traced.uns["iroot"])] and summary["root_rule"] == "farthest"
    assert summary["n_groups"] == traced.obs["leiden"].nunique() and summary["pseudotime_finite_fraction"] == 1.0
    assert is_png(out / "trajectory.png")

    out = tmp_path / "by_branch"
    assert run("trajectory", "--data", files["traj"], "--use-rep", "X_pca", "--root-label", "trunk", "--groups-key",
               "branch", "--root-rule", "first_component", "--output", out) == 0
    params = ad.read_h5ad(out / "traj.h5ad").uns["trajectory"]["params"]
    assert params["groups_key"] == "branch" and params["root_rule"] == "first_component"
    assert json.loads((out / "trajectory.json").read_text())["n_groups"] == 3  # trunk and 2 branches

    capsys.readouterr()
    assert run("trajectory", "--data", files["traj"], "--use-rep", "X_pca", "--output", tmp_path / "x") == 2
    assert "--root-cell" in capsys.readouterr().err
