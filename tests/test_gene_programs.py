"""Gene embeddings (FORMATS.md), which genes pretraining saw, gene programs, program scores, and the gene-set
cohesion test: on planted embeddings, on a tiny model pretrained here on cells with a planted co-expressed module,
and on the shipped model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData, read_h5ad

from atlasformer.analysis import genes as G
from atlasformer.checkpoints import load_model_folder, load_weights_only
from atlasformer.finetune.common import model_batch
from atlasformer.pretrain import PretrainConfig, train
from atlasformer.tokenization import CellTokenizer, GeneVocab, InputError, TokenizerConfig, tokenize_anndata

N_OTHER, N_MODULE = 100, 20
MODULE = [f"RPL{i + 1}" for i in range(N_MODULE)]


def planted_counts(n_cells: int = 400, seed: int = 0) -> AnnData:
    """Counts of 100 background genes and a module RPL1..RPL20 that goes up together (x e^2.5) in half the cells."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 1.2, size=N_OTHER + N_MODULE)
    on = rng.random(n_cells) < 0.5
    logits = np.tile(base, (n_cells, 1))
    logits[on, N_OTHER:] += 2.5
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    counts = rng.poisson(rng.lognormal(np.log(2000), 0.3, n_cells)[:, None] * p).astype(np.float32)
    obs = pd.DataFrame({"module_on": on}, index=[f"cell{i}" for i in range(n_cells)])
    return AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"GENE{i}" for i in range(N_OTHER)] + MODULE))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model pretrained here (100 steps, ~6 s) on the planted cells; 64 genes per cell, so the least
    expressed vocabulary genes are never a token."""
    folder = tmp_path_factory.mktemp("genes")
    adata = planted_counts()
    path = folder / "planted.h5ad"
    adata.write_h5ad(path)
    cfg = PretrainConfig(
        data=(str(path),), output=str(folder / "run"), model={"d_model": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.0},
        tokenizer=TokenizerConfig(max_seq_len=64, n_bins=21, gene_id_mode="raw"), max_steps=100, batch_size=32,
        lr=3e-3, warmup_steps=10, eval_every=100, save_every=100, log_every=100, seed=0, threads=1, cpu=True)
    model_dir = train(cfg)
    embeddings = G.gene_embeddings(str(model_dir), data=adata, corpus=[path], cpu=True)
    return {"adata": adata, "path": path, "model_dir": model_dir, "run": folder / "run", "embeddings": embeddings}


# ----------------------------------------------------------------------------------- embeddings
def test_gene_embeddings_follow_the_formats_contract(tiny, tmp_path):
    ge = tiny["embeddings"]
    model, tokenizer = load_model_folder(tiny["model_dir"])
    table = model.backbone.embeddings.genes.weight.detach().numpy()
    assert list(ge.obs_names) == tokenizer.vocab.genes and not set(tokenizer.vocab.specials) & set(ge.obs_names)
    assert ge.shape == (len(tokenizer.vocab.genes), model.config.d_model)
    np.testing.assert_array_equal(ge.X, table[tokenizer.vocab.lookup(ge.obs_names)])  # rows of the table
    assert ge.obs["seen_in_pretraining"].dtype == bool
    assert ge.layers["context"].shape == ge.shape and ge.obs["n_cells_seen"].max() <= tiny["adata"].n_obs
    assert ge.uns["gene_embeddings"]["seen_from"] == "corpus"
    ge.write_h5ad(tmp_path / G.GENE_EMBEDDINGS_FILE)  # what `atlasformer genes embed` writes
    back = read_h5ad(tmp_path / G.GENE_EMBEDDINGS_FILE)
    assert {"symbol", "ensembl_id", "seen_in_pretraining"} <= set(back.obs) and back.obs["seen_in_pretraining"].dtype == bool


def test_vocabulary_metadata_maps_ensembl_ids_and_symbols_both_ways():
    resolved = CellTokenizer(GeneVocab(["ENSG00000167286", "MYGENE"]), TokenizerConfig(gene_id_mode="resolve"))
    meta = G.vocabulary_metadata(resolved)
    assert meta.loc["ENSG00000167286", "symbol"] == "CD3D" and meta.loc["ENSG00000167286", "ensembl_id"] == "ENSG00000167286"
    assert meta.loc["MYGENE", "symbol"] == "MYGENE" and meta.loc["MYGENE", "ensembl_id"] == ""
    raw = G.vocabulary_metadata(CellTokenizer(GeneVocab(["CD3D"]), TokenizerConfig(gene_id_mode="raw")))
    assert raw.loc["CD3D", "ensembl_id"] == "ENSG00000167286"


def test_context_embedding_is_the_mean_hidden_state_over_the_cells_with_the_gene(tiny):
    model, tokenizer = load_model_folder(tiny["model_dir"])
    backbone = model.backbone.eval()
    cells = tiny["adata"][:40].copy()
    ge = G.gene_embeddings((model, tokenizer), data=cells, cpu=True)
    gene = "RPL3"
    gene_id = tokenizer.vocab.token_to_id[gene]
    tokens = tokenize_anndata(cells, tokenizer).cells
    by_hand = []
    with torch.no_grad():
        for i in range(len(tokens)):  # one cell at a time, no padding
            ids, _ = tokens.cell(i)
            if gene_id in ids:
                hidden = backbone(**model_batch(tokens, np.array([i]), tokenizer)).hidden_states[0, 1:]
                by_hand.append(hidden[int(np.flatnonzero(ids == gene_id)[0])].numpy())
    assert ge.obs.loc[gene, "n_cells_seen"] == len(by_hand) > 5
    np.testing.assert_allclose(ge[gene].layers["context"][0], np.mean(by_hand, axis=0), rtol=1e-4, atol=1e-5)
    absent = ge.obs["n_cells_seen"].to_numpy() == 0  # never a token in these cells: no context, NaN
    assert absent.any() and np.isnan(ge.layers["context"][absent]).all()


def test_seen_genes_are_the_rows_pretraining_updated(tiny):
    """The corpus derivation equals the rows AdamW holds gradient statistics for; the weights-only test never
    calls an untouched row seen and finds the frequently seen genes."""
    ge = tiny["embeddings"]
    corpus_seen = ge.obs["seen_in_pretraining"].to_numpy()
    state = load_weights_only(next((tiny["run"] / "checkpoints").glob("step-*")) / "optimizer.pt")["state"]
    model, tokenizer = load_model_folder(tiny["model_dir"])
    shape = tuple(model.backbone.embeddings.genes.weight.shape)
    exp_avg_sq = next(s["exp_avg_sq"] for s in state.values() if tuple(s["exp_avg_sq"].shape) == shape)
    updated = (exp_avg_sq.numpy() > 0).any(1)[tokenizer.vocab.lookup(ge.obs_names)]
    np.testing.assert_array_equal(corpus_seen, updated)
    assert 0 < (~corpus_seen).sum() < len(corpus_seen) / 2  # 64 of 120 genes per cell: some never a token
    by_weights = G.gene_embeddings(str(tiny["model_dir"]), cpu=True)
    assert by_weights.uns["gene_embeddings"]["seen_from"] == "weights"
    weights_seen = by_weights.obs["seen_in_pretraining"].to_numpy()
    assert not (weights_seen & ~corpus_seen).any()
    frequent = ge.obs["pretraining_cells"].to_numpy() >= 50
    assert weights_seen[frequent].all()


# --------------------------------------------------------------------------------- enrichment
def planted_gene_embeddings(n_genes=300, dim=16, seed=0) -> AnnData:
    """Random embeddings with two planted cohesive sets (a shared direction plus noise), all seen."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_genes, dim))
    x[:15] = rng.normal(size=dim) * 1.5 + rng.normal(size=(15, dim))  # set A
    x[15:30] = rng.normal(size=dim) * 1.5 + rng.normal(size=(15, dim))  # set B
    obs = pd.DataFrame({"symbol": [f"G{i}" for i in range(n_genes)], "seen_in_pretraining": True,
                        "pretraining_cells": rng.integers(1, 1000, size=n_genes)}, index=[f"ID{i}" for i in range(n_genes)])
    return AnnData(x.astype(np.float32), obs=obs)


def mean_pairwise_cosine_by_hand(x: np.ndarray) -> float:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ unit.T
    return float(sims[np.triu_indices(len(x), k=1)].mean())


def test_enrichment_statistic_and_p_value_on_planted_embeddings():
    ge = planted_gene_embeddings()
    planted = [f"G{i}" for i in range(15)]
    random_set = [f"G{i}" for i in np.random.default_rng(5).choice(np.arange(30, 300), 15, replace=False)]
    result = G.gene_set_enrichment(ge, {"planted": planted, "random": random_set}, n_permutations=999, seed=3)
    centred = ge.X.astype(np.float64) - ge.X.astype(np.float64).mean(0)
    assert result.loc["planted", "cohesion"] == pytest.approx(mean_pairwise_cosine_by_hand(centred[:15]), abs=1e-6)
    assert result.loc["planted", "p_value"] < 0.01 and result.loc["planted", "effect"] > 3
    assert result.loc["random", "p_value"] > 0.05
    # the p-value and effect by hand, from the same random sets (the first set draws first from the seed)
    bins = G.frequency_bins(ge.obs["pretraining_cells"].to_numpy(float), 10)
    draws = G.matched_random_sets(bins, bins[:15], 999, np.random.default_rng(3))
    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    null = np.array([mean_pairwise_cosine_by_hand(centred[d]) for d in draws[:50]])
    np.testing.assert_allclose(G.mean_pairwise_cosine(unit[draws[:50]]), null, atol=1e-9)
    null = G.mean_pairwise_cosine(unit[draws])
    observed = result.loc["planted", "cohesion"]
    assert result.loc["planted", "p_value"] == pytest.approx((1 + (null >= observed).sum()) / 1000)
    assert result.loc["planted", "effect"] == pytest.approx((observed - null.mean()) / null.std(ddof=1))
    # matched draws: the set's bin composition, no gene twice in a set
    assert all(np.array_equal(np.sort(bins[d]), np.sort(bins[:15])) and len(set(d)) == 15 for d in draws[:100])


def test_ribosomal_set_takes_ribosomal_proteins_only():
    kept = ["RPL13A", "RPS4Y1", "RPL7L1", "RPLP0", "RPSA", "RPS27A", "RPL41"]
    left_out = ["RPL13AP5", "RPL13P5", "RPS6KA1", "RPS19BP1", "RPS10-NUDT3", "MRPL13"]
    assert [s for s in kept + left_out if G.is_ribosomal_protein(s)] == kept


def test_enrichment_leaves_out_unseen_members_and_reports_small_sets():
    ge = planted_gene_embeddings()
    ge.obs.loc[["ID0", "ID1"], "seen_in_pretraining"] = False
    result = G.gene_set_enrichment(ge, {"planted": [f"G{i}" for i in range(15)], "tiny": ["G40", "G41", "NOPE"]},
                                   n_permutations=99)
    assert result.loc["planted", "n_present"] == 13 and "G0" not in result.loc["planted", "members"].split(",")
    assert result.loc["tiny", "n_present"] == 2 and np.isnan(result.loc["tiny", "p_value"])
    with pytest.raises(InputError, match="use_rep"):
        G.gene_set_enrichment(ge, {"planted": ["G1"]}, use_rep="nope")


def test_planted_module_is_enriched_in_a_model_pretrained_here(tiny):
    """The issue's test: the co-expressed module, named like ribosomal proteins (RPL1..RPL20), is the default
    'ribosomal' set and comes out enriched in the input embedding of a model pretrained in this test; a random
    set of background genes does not."""
    ge = tiny["embeddings"]
    assert sorted(G.reference_gene_sets(ge)["ribosomal"]) == sorted(MODULE)
    random_set = list(np.random.default_rng(1).choice([f"GENE{i}" for i in range(N_OTHER)], 20, replace=False))
    result = G.gene_set_enrichment(ge, {**G.reference_gene_sets(ge), "random": random_set}, n_permutations=999)
    assert result.loc["ribosomal", "matched_on"] == "pretraining_cells"
    assert result.loc["ribosomal", "p_value"] < 0.01 and result.loc["ribosomal", "effect"] > 3, result
    assert result.loc["random", "p_value"] > 0.05, result
    assert result.loc["T cell", "n_present"] == 0  # marker sets of real genes: absent here, not tested


# ------------------------------------------------------------------------------ programs, scores
def test_gene_programs_recover_planted_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 3
    x = np.concatenate([c + rng.normal(size=(40, 16)) for c in centres] + [rng.normal(size=(3, 16)) * 8])
    obs = pd.DataFrame({"symbol": [f"G{i}" for i in range(123)], "seen_in_pretraining": True},
                       index=[f"ID{i}" for i in range(123)])
    obs.loc["ID5", "seen_in_pretraining"] = False
    ge = AnnData(x.astype(np.float32), obs=obs)
    # gauss connectivities: umap's spend ~15 s compiling (numba) once per process; Leiden is the same
    programs = G.gene_programs(ge, n_neighbors=10, resolution=0.5, min_size=5, method="gauss")
    assert len(programs) == 3 and programs["n_genes"].sum() == 122  # every seen gene, ID5 left out
    planted = [{f"ID{i}" for i in range(40 * k, 40 * (k + 1))} - {"ID5"} for k in range(3)]
    for found in programs["gene_ids"]:
        assert max(len(set(found) & p) / len(set(found) | p) for p in planted) > 0.9
    assert pd.isna(ge.obs.loc["ID5", "program"])  # unseen: not clustered
    assert ge.uns["program"]["n_neighbors"] == 10
    assert programs["symbols"].iloc[0][0].startswith("G")
    smallest = programs["n_genes"].min()
    fewer = G.gene_programs(ge, n_neighbors=10, resolution=0.5, min_size=smallest + 1, method="gauss", key_added="big")
    assert len(fewer) == 2 and ge.obs["big"].isna().sum() == 1 + smallest  # the small cluster is no program


def test_score_programs_writes_only_obs_and_follows_the_module():
    adata = planted_counts(n_cells=200, seed=1)
    before = adata.X.copy()
    columns = G.score_programs(adata, {"module": MODULE, "absent": ["NOT_A_GENE"]}, gene_id_mode="raw")
    assert columns == ["program_module"]  # a program with no gene in the data is skipped
    assert (adata.X != before).nnz == 0 and list(adata.obs.columns) == ["module_on", "program_module"]
    on = adata.obs["module_on"].to_numpy()
    assert adata.obs.loc[on, "program_module"].min() > adata.obs.loc[~on, "program_module"].max()
    with pytest.raises(InputError, match="no program"):
        G.score_programs(adata, {"absent": ["NOT_A_GENE"]}, gene_id_mode="raw")


# ------------------------------------------------------------------------------- shipped model
def test_shipped_model_ribosomal_genes_are_cohesive_among_the_genes_it_saw():
    ge = G.gene_embeddings("atlasformer-public-small", cpu=True)
    assert ge.uns["gene_embeddings"]["seen_from"] == "weights"
    # benchmarks/results/gene_programs.md: 13,976 genes were tokens of training cells, 13,965 by the weights test
    assert 13_900 < ge.obs["seen_in_pretraining"].sum() <= 13_976
    assert ge.obs.loc["ENSG00000167286", "symbol"] == "CD3D"
    sets = G.reference_gene_sets(ge)
    result = G.gene_set_enrichment(ge, {"ribosomal": sets["ribosomal"]}, n_permutations=199)
    assert result.loc["ribosomal", "n_present"] > 80 and result.loc["ribosomal", "p_value"] < 0.01
    assert result.loc["ribosomal", "effect"] > 20
