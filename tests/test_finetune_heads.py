"""Task heads, MCV / modality metrics, frozen and LoRA modes, and save/load of every task (simulated data)."""

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from atlasformer.finetune import FinetuneConfig, Imputer, Integrator, ModalityPredictor, finetune_file, fit
from atlasformer.finetune.fit import apply_mode
from atlasformer.finetune.metrics import (
    atac_metrics,
    binomial_thinning,
    clr,
    mcv_pearson_log1p,
    mcv_poisson_nll,
    protein_metrics,
    row_normalised,
)
from atlasformer.model_zoo import (
    CellTransformerConfig,
    CellTransformerForAnnotation,
    CellTransformerForImputation,
    CellTransformerForIntegration,
    CellTransformerForModality,
)
from atlasformer.model_zoo.task_heads import grad_reverse
from atlasformer.tokenization import InputError, TokenizerConfig

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.0}


def tiny_cfg(**kw):
    base = dict(from_scratch=True, scratch_model=TINY, max_seq_len=64, epochs=1,
                batch_size=32, lr=2e-3, head_lr=3e-3, seed=0)
    return FinetuneConfig(**{**base, **kw})


def batch_of(n=4, seq=9, vocab=40, n_bins=51):
    torch.manual_seed(0)
    ids = torch.randint(3, vocab, (n, seq))
    ids[:, 0] = 1
    return {"input_ids": ids, "values": torch.randint(1, n_bins, (n, seq)).float(),
            "attention_mask": torch.ones(n, seq, dtype=torch.bool)}


def config(**head):
    return CellTransformerConfig(vocab_size=40, **TINY, **head)


# ----------------------------------------------------------------------------------------- heads
def test_gradient_reversal_flips_and_scales_the_gradient():
    x = torch.ones(3, requires_grad=True)
    grad_reverse(x, 0.5).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), -0.5))


def test_integration_head_losses_and_adversaries():
    batch, labels = batch_of(), torch.tensor([0, 1, 0, 1])
    mask = torch.zeros(4, 9, dtype=torch.bool)
    mask[:, 1:4] = True
    targets = {"value_targets": batch["values"], "target_mask": mask, "counts": torch.tensor([[1.0, 0, 3]] * 4)}
    names = {"batch_names": ["a", "b"], "feature_names": ["g1", "g2", "g3"]}

    model = CellTransformerForIntegration(config(**names))  # default: domain confusion
    out = model(**batch, batch_labels=labels, **targets)
    assert set(out.loss_terms) == {"masked_value", "expression", "discriminator", "adversarial"}
    assert out.logits.shape == (4, 2) and out.cell_embedding.shape == (4, 32)
    disc = model.batch_discriminator.out.bias
    # the discriminator learns only from its own loss; the encoder's term leaves it alone
    assert torch.autograd.grad(out.loss_terms["adversarial"], disc, retain_graph=True, allow_unused=True)[0] is None
    assert torch.autograd.grad(out.loss_terms["discriminator"], model.backbone.embeddings.genes.weight,
                               retain_graph=True, allow_unused=True)[0] is None
    assert model(**batch).loss is None  # no targets, no loss: embedding needs no batch

    reversal = CellTransformerForIntegration(config(**names, adversary="reversal"))
    out = reversal(**batch, batch_labels=labels, **targets)
    assert "discriminator" not in out.loss_terms
    # the encoder receives minus the gradient of the discriminator's loss
    cell = out.cell_embedding
    g_rev = torch.autograd.grad(out.loss_terms["adversarial"], cell, retain_graph=True)[0]
    plain = torch.nn.functional.cross_entropy(reversal.batch_discriminator(cell), labels)
    assert torch.allclose(g_rev, -torch.autograd.grad(plain, cell)[0], atol=1e-6)


def test_imputation_head_nb_and_zinb():
    for likelihood in ("nb", "zinb"):
        model = CellTransformerForImputation(config(feature_names=[f"g{i}" for i in range(7)], likelihood=likelihood))
        out = model(**batch_of(), library_size=torch.full((4,), 100.0), counts=torch.randint(0, 5, (4, 7)).float())
        props = out.extras["proportions"]
        assert props.shape == (4, 7) and torch.allclose(props.sum(1), torch.ones(4))
        assert torch.isfinite(out.loss) and likelihood in out.loss_terms


def test_modality_head_protein_and_atac():
    names = ["p1", "p2", "p3"]
    protein = CellTransformerForModality(config(modality="protein", feature_names=names))
    out = protein(**batch_of(), targets=torch.randn(4, 3))
    assert "mse" in out.loss_terms and torch.equal(out.extras["predictions"], out.logits)
    atac = CellTransformerForModality(config(modality="atac", feature_names=names))
    out = atac(**batch_of(), targets=torch.ones(4, 3))
    assert "bce" in out.loss_terms and ((out.extras["predictions"] > 0) & (out.extras["predictions"] < 1)).all()
    with pytest.raises(ValueError, match="modality"):
        CellTransformerForModality(config(modality="rna", feature_names=names))


# ----------------------------------------------------------------------------------------- metrics
def test_binomial_thinning_splits_every_count():
    counts = sp.random(50, 30, density=0.3, random_state=0, format="csr", data_rvs=lambda n: np.random.default_rng(0).integers(1, 20, n))
    x_train, x_test = binomial_thinning(counts, 0.9, seed=1)
    assert np.array_equal((x_train + x_test).toarray(), counts.toarray())
    assert 0.85 < x_train.sum() / counts.sum() < 0.95
    again, _ = binomial_thinning(counts, 0.9, seed=1)
    assert np.array_equal(again.toarray(), x_train.toarray())


def test_mcv_metrics_prefer_the_true_rates():
    rng = np.random.default_rng(0)
    truth = rng.dirichlet(np.ones(200) * 0.3, size=100)  # (cells, genes) expression proportions
    counts = sp.csr_matrix(rng.poisson(truth * 500))
    x_train, x_test = binomial_thinning(counts, 0.9, seed=0)
    true_nll = mcv_poisson_nll(truth, x_test)
    assert true_nll < mcv_poisson_nll(row_normalised(x_train), x_test)
    assert mcv_pearson_log1p(truth, x_test, x_train) > mcv_pearson_log1p(np.ones_like(truth), x_test, x_train)


def test_clr_and_modality_metrics():
    values = clr(np.array([[1.0, 10, 100], [0, 0, 5]]))
    assert np.allclose(values.sum(1), 0)
    perfect = protein_metrics(values, values)
    assert perfect["rmse"] == 0 and perfect["pearson_per_feature"] == pytest.approx(1)
    truth = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    assert atac_metrics(truth, truth * 0.9 + 0.05)["auroc"] == 1.0
    assert atac_metrics(truth, 1 - truth)["auroc_per_feature"] == 0.0


# ----------------------------------------------------------------------------------------- modes
def _fit_briefly(model, mode):
    cfg = FinetuneConfig(mode=mode, epochs=1, max_steps=3, batch_size=4, lr=1e-2, head_lr=1e-2, warmup_ratio=0.0)
    batch = batch_of(8)
    labels = torch.tensor([0, 1] * 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained, _ = fit(model, 8, lambda rows: {**{k: v[rows] for k, v in batch.items()}, "labels": labels[rows]},
                     lambda m: (0.0, {}), cfg, log=lambda s: None)
    after = trained.state_dict()
    assert set(after) == set(before)  # LoRA adapters are merged away
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_frozen_mode_trains_only_the_head():
    model = CellTransformerForAnnotation(config(id2label={0: "a", 1: "b"}))
    trainable = {n for n, p in apply_mode(CellTransformerForAnnotation(config(id2label={0: "a", 1: "b"})),
                                          FinetuneConfig(mode="frozen")).named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("classifier.") for n in trainable)
    changed = _fit_briefly(model, "frozen")
    assert changed and all(k.startswith("classifier.") for k in changed)


def test_lora_mode_trains_adapters_and_head_only():
    wrapped = apply_mode(CellTransformerForAnnotation(config(id2label={0: "a", 1: "b"})), FinetuneConfig(mode="lora"))
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    assert all("lora_" in n or n.startswith("classifier.") for n in trainable)
    changed = _fit_briefly(CellTransformerForAnnotation(config(id2label={0: "a", 1: "b"})), "lora")
    backbone = {k for k in changed if k.startswith("backbone.")}
    assert backbone and all(".attention.in_proj." in k or ".attention.out_proj." in k for k in backbone)
    assert any(k.startswith("classifier.") for k in changed)


# ----------------------------------------------------------------------------------------- tasks
@pytest.fixture(scope="module")
def sim():
    from atlasformer.tokenization import simulate_counts

    adata = simulate_counts(n_cells=160, n_genes=120, n_cell_types=3, n_batches=2, seed=1)
    protein = ad.AnnData(sp.csr_matrix(np.random.default_rng(0).poisson(
        5 * (1 + adata.obs["cell_type"].cat.codes.to_numpy()[:, None] * np.arange(1, 5)[None])).astype(np.float32)),
        obs=adata.obs[[]].copy())
    protein.var_names = ["CD3", "CD4", "CD8", "CD19"]
    return adata, protein


def _roundtrip(task, cls, adata, tmp_path, check_config, **fit_kw):
    summary = finetune_file(task, _write(adata, tmp_path), tmp_path / "out", extra_inputs=fit_kw or None)
    folder = tmp_path / "out" / "model"
    saved = json.loads((folder / "config.json").read_text())
    check_config(saved)
    again = cls.load(folder)
    np.testing.assert_allclose(again.predict(adata), task.predict(adata), rtol=1e-4, atol=1e-5)
    assert (tmp_path / "out" / "metrics.json").exists() and summary["plots"]
    return ad.read_h5ad(tmp_path / "out" / "sim.h5ad"), summary


def _write(adata, tmp_path):
    path = tmp_path / "sim.h5ad"
    adata.write_h5ad(path)
    return path


def test_integration_task_roundtrip(sim, tmp_path):
    adata, _ = sim
    task = Integrator(None, tiny_cfg(), batch_key="batch", labels_key=None)
    out, summary = _roundtrip(task, Integrator, adata, tmp_path,
                              lambda c: c["architectures"] == ["CellTransformerForIntegration"] and c["batch_names"])
    # the recipe integrates [expression PCs; embedding] with Harmony: d_model + the path's components wide
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert config["harmony"] and config["expression_components"] > 0
    assert out.obsm["X_atlasformer_integrated"].shape == (adata.n_obs, 32 + config["expression_components"])
    assert "batch_mixing_entropy" in summary["validation"]
    with pytest.raises(InputError, match="batch_key"):
        Integrator(None, tiny_cfg(), batch_key="donor").fit(adata)


def test_imputation_task_roundtrip(sim, tmp_path):
    adata, _ = sim
    out, summary = _roundtrip(Imputer(None, tiny_cfg(val_fraction=0.2)), Imputer, adata, tmp_path,
                              lambda c: len(c["feature_names"]) == adata.n_vars)
    denoised = out.layers["atlasformer_denoised"]
    assert denoised.shape == adata.shape and np.allclose(denoised.sum(1), 1e4, rtol=1e-3)
    assert {"poisson_nll", "pearson_log1p", "no_denoising"} <= set(summary["validation"])
    # a file lacking some of the model's genes: those columns are reported, the rest predicted
    part = adata[:, 10:].copy()
    assert not np.isnan(Imputer.load(tmp_path / "out" / "model").predict(part)).any()


def test_modality_task_roundtrip_and_checks(sim, tmp_path):
    adata, protein = sim
    task = ModalityPredictor(None, tiny_cfg(val_fraction=0.2), modality="protein", paired=protein)
    out, summary = _roundtrip(task, ModalityPredictor, adata, tmp_path,
                              lambda c: c["modality"] == "protein" and c["feature_names"] == list(protein.var_names))
    assert out.obsm["protein_predicted"].shape == (adata.n_obs, 4)
    assert list(out.uns["protein_predicted_names"]) == list(protein.var_names)
    assert "mean_baseline" in summary["validation"]
    plotted = task._plot_data  # the scatter draws the mean baseline beside the predictions
    assert plotted["baseline"].shape == plotted["true"].shape == plotted["pred"].shape
    shuffled = protein[::-1].copy()  # same cells in another order: aligned by obs_names
    ModalityPredictor(None, tiny_cfg(max_steps=1), paired=shuffled).fit(adata)
    with pytest.raises(InputError, match="obs_names must be identical"):
        ModalityPredictor(None, tiny_cfg(), paired=protein[:50].copy()).fit(adata)
    # paired values in obsm; cells with all-NaN rows are RNA-only (not trained on, still predicted)
    with_obsm = adata.copy()
    values = protein.X.toarray()
    values[:20] = np.nan
    with_obsm.obsm["adt"] = values
    with_obsm.uns["adt_names"] = list(protein.var_names)
    rna_only = ModalityPredictor(None, tiny_cfg(max_steps=1), paired_obsm="adt")
    metrics = rna_only.fit(with_obsm)
    assert metrics["n_train"] + metrics["n_val"] == adata.n_obs - 20
    assert not np.isnan(rna_only.predict(with_obsm)[:20]).any()


def test_cli_finetune_and_predict_every_new_task(sim, tmp_path):
    from atlasformer.cli import main

    adata, protein = sim
    data, paired = tmp_path / "cells.rna.h5ad", tmp_path / "cells.protein.h5ad"
    adata.write_h5ad(data)
    protein.write_h5ad(paired)
    quick = ["max_steps=2", "val_fraction=0.2", "max_seq_len=32", "scratch_model.d_model=16", "scratch_model.n_heads=2"]
    runs = {
        "integration": (["--batch-key", "batch"], lambda out: out.obsm["X_atlasformer_integrated"].shape[1] == 16 + json.loads(
            (tmp_path / "integration" / "model" / "config.json").read_text())["expression_components"]),
        "imputation": ([], lambda out: out.layers["atlasformer_denoised"].shape == adata.shape),
        "modality": (["--modality", "protein", "--paired", str(paired)],
                     lambda out: list(out.uns["protein_predicted_names"]) == list(protein.var_names)),
    }
    for task, (flags, check) in runs.items():
        assert main(["finetune", task, "--data", str(data), "--from-scratch", "--output", str(tmp_path / task),
                     *flags, *quick]) == 0
        assert main(["predict", task, "--model", str(tmp_path / task / "model"), "--data", str(data),
                     "--output", str(tmp_path / task / "pred")]) == 0
        assert check(ad.read_h5ad(tmp_path / task / "pred" / "cells.h5ad")), task
    # an output folder that would overwrite the input is refused
    plain = tmp_path / "plain.h5ad"
    adata.write_h5ad(plain)
    assert main(["predict", "imputation", "--model", str(tmp_path / "imputation" / "model"), "--data", str(plain),
                 "--output", str(tmp_path)]) == 2


def test_imputation_with_raw_gene_names_predicts_every_gene(sim, tmp_path):
    """Var names without usable IDs ('0', '1', ...) work with gene_id_mode=raw in fit and predict alike."""
    adata = sim[0].copy()
    adata.var_names = [str(i) for i in range(adata.n_vars)]
    raw = TokenizerConfig(gene_id_mode="raw")
    imputer = Imputer(None, tiny_cfg(val_fraction=0.2, max_steps=2, tokenizer=raw, max_seq_len=64))
    imputer.fit(adata)
    assert list(imputer.model.config.feature_names) == list(adata.var_names)
    assert not np.isnan(imputer.predict(adata)).any()
    # a folder loaded with another task's class is refused with a clear error, not a wrong model
    from atlasformer.finetune import Annotator

    imputer.save(tmp_path / "imputer")
    with pytest.raises(InputError, match="not a model for Annotator"):
        Annotator.load(tmp_path / "imputer")


def test_imputation_feature_positions_with_shared_and_missing_keys():
    import pandas as pd

    from atlasformer.finetune.imputation import feature_positions

    features = ["ENSG1", "ENSG2", "ENSG2", None, "ENSG3"]  # two genes of one ID; one gene without an ID
    assert list(feature_positions(features, pd.Index(features, dtype=object))) == [0, 1, 2, 3, 4]
    other = pd.Index(["ENSG2", "ENSG9", None, "ENSG3"], dtype=object)
    assert list(feature_positions(features, other)) == [1, -1, -1, 4]


def test_atac_penalty_one_standard_error_rule():
    """The ATAC readout keeps the strongest penalty unless a weaker one wins by more than the validation noise."""
    from atlasformer.finetune.modality import one_standard_error_choice

    rng = np.random.default_rng(0)
    true = rng.random((200, 30)) < np.linspace(0.05, 0.6, 30)  # (cells, peaks), peaks differ in frequency
    frequency = np.broadcast_to(true.mean(0), true.shape)  # the strong penalty: each peak's frequency
    noisy = frequency + 0.002 * true + rng.normal(0, 0.01, true.shape)  # a weak penalty: a hint of signal, in the noise
    informative = np.where(true, 0.9, 0.1) * 0.5 + frequency * 0.5  # a weak penalty that learned the cells
    chosen, scores, se = one_standard_error_choice(true, [frequency, noisy], seed=0)
    assert scores[1] > scores[0] and chosen == 0 and se > 0, (scores, se)  # argmax would take the weak one
    chosen, scores, se = one_standard_error_choice(true, [frequency, informative], seed=0)
    assert chosen == 1 and scores[1] > scores[0] + se, (scores, se)


def test_umap_panels_work_beyond_4096_cells(tmp_path):
    """scanpy 1.11's default neighbour search fails from 4,096 cells under scipy >= 1.15; the integration plots
    (up to 20,000 cells) must not."""
    import pandas as pd

    from atlasformer.finetune.plots import umap_panels

    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"cell_type": rng.choice(["a", "b"], 4200)})
    emb = rng.normal(size=(4200, 8)).astype(np.float32)
    umap_panels({"emb": emb}, obs, "cell_type", tmp_path / "umap.png")
    assert (tmp_path / "umap.png").stat().st_size > 0


def _fit_from_the_validation_optimum(start_is_candidate: bool) -> tuple[torch.nn.Module, dict]:
    """A linear model started at the least-squares fit of the validation cells, then trained on training cells
    whose targets disagree: every step moves it away from the validation optimum."""
    gen = torch.Generator().manual_seed(0)
    x_train, x_val = torch.randn(64, 3, generator=gen), torch.randn(32, 3, generator=gen)
    w_val = torch.tensor([1.0, -2.0, 0.5])
    y_train, y_val = x_train @ -w_val, x_val @ w_val

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, 1, bias=False)
            self.head.weight.data.copy_(w_val[None])

        def forward(self, x, y):
            return type("Output", (), {"loss": torch.nn.functional.mse_loss(self.head(x).squeeze(1), y)})()

    def validate(model):
        mse = float(model(x_val, y_val).loss)
        return -mse, {"mse": mse}

    cfg = FinetuneConfig(max_steps=20, eval_every=5, batch_size=16, head_lr=0.05, lr=0.05, cpu=True)
    model, metrics = fit(Linear(), 64, lambda rows: {"x": x_train[rows], "y": y_train[rows]}, validate, cfg,
                         metric="mse", lower_is_better=True, start_is_candidate=start_is_candidate)
    return model, metrics


def test_a_closed_form_start_is_kept_when_fine_tuning_never_beats_it_on_validation():
    """Annotation and modality heads start from their closed-form fit; fine-tuning (mode=full or lora) that only
    makes validation worse returns that fit instead of the least bad trained weights."""
    kept, metrics = _fit_from_the_validation_optimum(start_is_candidate=True)
    np.testing.assert_allclose(kept.head.weight.detach()[0].numpy(), [1.0, -2.0, 0.5], atol=1e-6)
    assert metrics["mse"] < 1e-10
    moved, metrics = _fit_from_the_validation_optimum(start_is_candidate=False)
    assert metrics["mse"] > 0.01  # without it, the best of the trained weights (all worse than the start)
    assert not np.allclose(moved.head.weight.detach()[0].numpy(), [1.0, -2.0, 0.5], atol=1e-3)
