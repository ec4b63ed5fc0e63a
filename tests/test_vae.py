"""VAE baselines (likelihoods: test_likelihoods.py): module shapes and loss terms, scVI / totalVI smoke
runs on real data, save / load."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from atlasformer.checkpoints import CheckpointError
from atlasformer.finetune.metrics import clr
from atlasformer.finetune.vae_models import SCVIModel, TOTALVIModel, max_epochs_heuristic, vae_training_config
from atlasformer.model_zoo.vae import (
    SCVIConfig,
    SCVIModule,
    TOTALVIConfig,
    TOTALVIModule,
)
from atlasformer.tokenization import InputError


@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
def test_scvi_module_shapes_and_loss_terms(likelihood):
    torch.manual_seed(0)
    module = SCVIModule(SCVIConfig(n_genes=50, n_batch=3, gene_likelihood=likelihood))
    x = torch.poisson(torch.rand(16, 50) * 3) + torch.eye(16, 50)  # every cell has counts
    batch = torch.randint(0, 3, (16, 1))
    out = module(x, batch, kl_weight=torch.tensor(0.5))
    assert out.cell_embedding.shape == (16, 10)
    assert set(out.loss_terms) == {"reconstruction", "kl_z"}
    torch.testing.assert_close(out.loss, out.loss_terms["reconstruction"] + out.loss_terms["kl_z"])
    torch.testing.assert_close(out.extras["scale"].sum(-1), torch.ones(16))
    out.loss.backward()
    assert module.px_r.grad is not None and module.scale_decoder.weight.grad.abs().sum() > 0
    assert module(x, batch, kl_weight=0.0).loss_terms["kl_z"] == 0


def test_scvi_decoder_depends_on_batch_encoder_does_not():
    torch.manual_seed(0)
    module = SCVIModule(SCVIConfig(n_genes=20, n_batch=2)).eval()
    x = torch.poisson(torch.rand(4, 20) * 3) + 1
    zeros, ones = torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1, dtype=torch.long)
    torch.testing.assert_close(module.encode(x, zeros).loc, module.encode(x, ones).loc)  # scvi-tools default
    assert not torch.allclose(module.normalized_expression(x, zeros), module.normalized_expression(x, ones))


def test_totalvi_module_losses_and_protein_mask():
    torch.manual_seed(0)
    config = TOTALVIConfig(n_genes=40, n_proteins=12, n_batch=2, n_hidden=32, n_latent=5)
    module = TOTALVIModule(config)
    x, y = torch.poisson(torch.rand(8, 40) * 3) + 1, torch.poisson(torch.rand(8, 12) * 20)
    batch = torch.tensor([[0], [1]] * 4)
    out = module(x, y, batch)
    assert set(out.loss_terms) == {"reconstruction_gene", "reconstruction_protein", "kl_z", "kl_background"}
    torch.testing.assert_close(out.loss, sum(out.loss_terms.values()))
    assert out.cell_embedding.shape == (8, 5)
    out.loss.backward()
    assert module.py_r.grad is not None
    # cells without protein measurement add no protein loss, whatever their protein values
    module.eval()
    hidden = torch.zeros(8)
    torch.manual_seed(1)
    a = module(x, torch.zeros_like(y), batch, protein_observed=hidden).loss_terms["reconstruction_protein"]
    assert a == 0
    pred = module.predict(x, y, batch, transform_batch=0, n_samples=3)
    assert pred["protein"].shape == (8, 12) and torch.isfinite(pred["protein"]).all()


def test_training_settings_follow_scvi_tools():
    cfg = vae_training_config(12261, seed=3)
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.adam_eps, cfg.schedule, cfg.batch_size) == \
        ("adam", 1e-3, 1e-6, 0.01, "constant", 128)
    assert cfg.epochs == 400 and cfg.clip_grad == 0 and cfg.seed == 3
    assert max_epochs_heuristic(40_000) == 200 and max_epochs_heuristic(100) == 400


def test_scvi_model_save_load_roundtrip(tmp_path, sim_adata):
    model = SCVIModel(batch_key="batch", epochs=2, seed=0, gene_likelihood="nb")
    metrics = model.fit(sim_adata)
    assert metrics["n_val"] == 60 and np.isfinite(metrics["elbo_validation"])
    folder = model.save(tmp_path / "scvi")
    loaded = SCVIModel.load(folder)
    np.testing.assert_allclose(loaded.embed(sim_adata), model.embed(sim_adata), rtol=1e-5, atol=1e-6)
    assert loaded.predict(sim_adata).shape == sim_adata.shape
    with pytest.raises(CheckpointError, match="TOTALVI"):
        TOTALVIModel.load(folder)
    (folder / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="SHA-256"):
        SCVIModel.load(folder)


def test_scvi_model_errors_name_the_problem(sim_adata):
    model = SCVIModel(batch_key="donor", epochs=1)
    with pytest.raises(InputError, match="batch_key='donor'"):
        model.fit(sim_adata)
    trained = SCVIModel(batch_key="batch", epochs=1)
    trained.fit(sim_adata)
    other = sim_adata.copy()
    other.obs["batch"] = "new-batch"
    with pytest.raises(InputError, match="not trained on"):
        trained.embed(other)


def test_scvi_smoke_on_kang_loss_decreases_and_latent_separates_cell_types(shared_data):
    adata = ad.read_h5ad(shared_data("kang_pbmc_8donors.h5ad"))
    adata = adata[np.sort(np.random.default_rng(0).choice(adata.n_obs, 1200, replace=False))].copy()
    model = SCVIModel(batch_key="batch", epochs=8, seed=0)
    model.fit(adata)
    assert model.history[-1] < model.history[0] - 50  # validation -ELBO per cell fell
    latent = model.embed(adata)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    accuracy = cross_val_score(KNeighborsClassifier(15), latent, labels, cv=3).mean()
    majority = np.unique(labels, return_counts=True)[1].max() / len(labels)
    assert accuracy > majority + 0.2, (accuracy, majority)


def test_totalvi_smoke_on_pbmc1k_cite_predicts_held_out_proteins(shared_data):
    rna = ad.read_h5ad(shared_data("pbmc1k_cite.rna.h5ad"))
    protein = ad.read_h5ad(shared_data("pbmc1k_cite.protein.h5ad"))
    observed = np.random.default_rng(0).random(rna.n_obs) < 0.5
    rna.obs["measured"] = np.where(observed, "yes", "no")
    model = TOTALVIModel(batch_key="measured", epochs=60, seed=0)
    model.fit(rna, protein, protein_observed=observed)
    assert model.history[-1] < model.history[0]
    pred = clr(model.predict(rna[~observed], transform_batch="yes").to_numpy())
    true = clr(protein.X[~observed])
    mean_rmse = np.sqrt(((true - clr(protein.X[observed]).mean(0)) ** 2).mean())
    assert np.sqrt(((true - pred) ** 2).mean()) < mean_rmse
    target = ad.AnnData(obs=rna.obs.copy())
    model.write_outputs(rna, target, protein=protein)
    assert target.obsm["protein_predicted"].shape == (rna.n_obs, protein.n_vars)
    assert list(target.uns["protein_predicted_names"]) == list(protein.var_names)


@pytest.mark.slow
def test_scvi_matches_scvi_tools_held_out_reconstruction(shared_data):
    """Parity with the reference (benchmarks/scvi_parity.py runs the full-size version)."""
    scvi = pytest.importorskip("scvi")
    adata = ad.read_h5ad(shared_data("kang_pbmc_8donors.h5ad"))
    adata = adata[np.sort(np.random.default_rng(0).choice(adata.n_obs, 3000, replace=False))].copy()
    held = np.arange(adata.n_obs) % 10 == 0
    train, test = adata[~held].copy(), adata[held].copy()
    ours = SCVIModel(batch_key="batch", epochs=30, seed=0)
    ours.fit(train)
    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(train, batch_key="batch")
    reference = scvi.model.SCVI(train)
    reference.train(max_epochs=30, batch_size=128, accelerator="cpu", enable_progress_bar=False, logger=False)
    ref_loss = float(reference.get_reconstruction_error(test)["reconstruction_loss"])
    assert abs(ours.reconstruction_loss(test) - ref_loss) / ref_loss < 0.05
