"""Simple baselines on small real files: each must beat the trivial predictor its task has."""

from __future__ import annotations

import functools

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from atlasformer.finetune import baselines as b
from atlasformer.finetune.metrics import binomial_thinning, clr, imputation_metrics, protein_metrics
from atlasformer.tokenization.anndata_io import to_csr


@functools.lru_cache(maxsize=4)
def read(path) -> ad.AnnData:
    return ad.read_h5ad(path)


@pytest.fixture
def kang(shared_data):
    adata = read(shared_data("kang_pbmc_8donors.h5ad"))
    return adata[np.sort(np.random.default_rng(0).choice(adata.n_obs, 2500, replace=False))].copy()


@pytest.fixture
def cite(shared_data):
    return read(shared_data("pbmc1k_cite.rna.h5ad")), read(shared_data("pbmc1k_cite.protein.h5ad"))


def test_hvgs_are_scanpy_seurat_on_training_cells_only(shared_data):
    adata = ad.read_h5ad(shared_data("pbmc4k_10x_v2.h5ad"))
    counts = to_csr(adata.X)
    train = np.arange(adata.n_obs) % 2 == 0
    features = b.RNAFeatures.fit(counts[train], seed=0)
    reference = ad.AnnData(counts[train].copy())
    sc.pp.normalize_total(reference, target_sum=1e4)
    sc.pp.log1p(reference)
    sc.pp.highly_variable_genes(reference, n_top_genes=2000, flavor="seurat")
    np.testing.assert_array_equal(features.hvgs, np.flatnonzero(reference.var["highly_variable"]))
    assert features.pcs(counts[~train]).shape == ((~train).sum(), 50)
    # test cells do not influence the features
    again = b.RNAFeatures.fit(counts[train], seed=0)
    np.testing.assert_allclose(again.pcs(counts[:5]), features.pcs(counts[:5]), rtol=1e-4, atol=1e-4)


def test_fewer_genes_than_requested_keeps_all(cite):
    rna, _ = cite
    features = b.RNAFeatures.fit(to_csr(rna.X), n_hvgs=2000, seed=0)
    assert len(features.hvgs) == rna.n_vars == 630


def test_logreg_and_pca_knn_beat_majority_class_on_a_held_out_donor(kang):
    counts, labels, donor = to_csr(kang.X), kang.obs["cell_type"].astype(str).to_numpy(), kang.obs["batch"].to_numpy()
    held = donor == donor[0]
    train, test = np.flatnonzero(~held), np.flatnonzero(held & np.isin(labels, labels[~held]))
    features = b.RNAFeatures.fit(counts[train], seed=0)
    majority = np.mean(labels[test] == max(set(labels[train]), key=list(labels[train]).count))
    pred = b.logreg(features.hvg_matrix(counts[train]), labels[train], features.hvg_matrix(counts[test]))
    assert np.mean(pred == labels[test]) > majority + 0.3
    pred = b.knn_classify(features.pcs(counts[train]), labels[train], features.pcs(counts[test]))
    assert np.mean(pred == labels[test]) > majority + 0.3


def test_harmony_mixes_donors_more_than_pcs(kang):
    counts, donor = to_csr(kang.X), kang.obs["batch"].astype(str).to_numpy()
    pcs = b.RNAFeatures.fit(counts, seed=0).pcs(counts)
    corrected = b.harmony(pcs, donor, seed=0)
    assert corrected.shape == pcs.shape

    def donor_predictability(x):
        return cross_val_score(KNeighborsClassifier(15), x, donor, cv=3).mean()

    assert donor_predictability(corrected) < donor_predictability(pcs) - 0.05


def test_ridge_and_knn_beat_the_mean_predictor_on_proteins(cite):
    rna, protein = cite
    counts, targets = to_csr(rna.X), clr(protein.X)
    perm = np.random.default_rng(0).permutation(rna.n_obs)
    train, test = np.sort(perm[: rna.n_obs // 2]), np.sort(perm[rna.n_obs // 2:])
    features = b.RNAFeatures.fit(counts[train], seed=0)
    x_train, x_test = features.pcs(counts[train]), features.pcs(counts[test])
    mean_rmse = protein_metrics(targets[test], b.mean_predictor(targets[train], len(test)))["rmse"]
    for pred in (b.ridge(x_train, targets[train], x_test), b.knn_regress(x_train, targets[train], x_test)):
        scores = protein_metrics(targets[test], pred)
        assert scores["rmse"] < 0.8 * mean_rmse and scores["pearson_per_feature"] > 0.4


def test_knn_smoothing_beats_no_denoising_poisson_nll(cite):
    rna, _ = cite
    x_train, x_test = binomial_thinning(to_csr(rna.X), p=0.9, seed=0)
    raw = b.no_denoising(x_train)
    np.testing.assert_allclose(raw.sum(1)[np.asarray(x_train.sum(1)).ravel() > 0], 1.0, rtol=1e-5)
    smoothed = b.knn_smoothing(x_train, b.RNAFeatures.fit(x_train, seed=0).pcs(x_train), k=15)
    np.testing.assert_allclose(smoothed.sum(1), raw.sum(1), rtol=1e-4)  # an average of proportions
    assert imputation_metrics(smoothed, x_test, x_train)["poisson_nll"] < imputation_metrics(raw, x_test, x_train)["poisson_nll"]


def test_knn_smoothing_includes_the_cell_itself_even_with_duplicates():
    x = to_csr(np.array([[1, 0], [1, 0], [1, 0], [0, 5]], dtype=np.float32))
    smoothed = b.knn_smoothing(x, np.array([[0.0], [0.0], [0.0], [10.0]]), k=1)
    np.testing.assert_allclose(smoothed, [[1, 0], [1, 0], [1, 0], [0, 1]])
