"""The expression path beside the embedding and the closed-form readouts: they contain the baseline they stand
beside (logistic regression on HVGs, ridge on PCs), save and load with the model, and are the task recipes."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.linear_model import LogisticRegression, RidgeCV

from atlasformer.finetune import Annotator, FinetuneConfig, Imputer, Integrator, ModalityPredictor
from atlasformer.finetune.baselines import RIDGE_ALPHAS, log_normalize
from atlasformer.finetune.common import cross_fitting_folds
from atlasformer.finetune.expression import (
    expression_inputs,
    fit_logistic_readout,
    fit_per_feature_logistic_readout,
    fit_ridge_readout,
    logistic_weights,
    out_of_fold_temperature,
    readout_features,
    standardise_embedding,
)
from atlasformer.finetune.metrics import expected_calibration_error
from atlasformer.model_zoo.task_heads import ExpressionPath, LinearReadout
from atlasformer.tokenization import CellTokenizer, TokenizerConfig, build_vocab, simulate_counts
from atlasformer.tokenization.simulate import simulate_proteins

TINY = {"d_model": 16, "n_layers": 1, "n_heads": 2, "dropout": 0.0}


def scratch(**kw):
    tok = TokenizerConfig(gene_id_mode="raw")
    return FinetuneConfig(**{"from_scratch": True, "scratch_model": TINY, "tokenizer": tok, "max_seq_len": 64, "max_steps": 5, **kw})


def readout_with_constant_embedding(n_expr, n_out, n_cells, d_model=8):
    """A readout whose embedding block is all zeros after standardisation (a constant embedding)."""
    readout = LinearReadout(d_model, n_expr, n_out)
    embedding = np.ones((n_cells, d_model), dtype=np.float32)
    standardise_embedding(readout, embedding)
    return readout, embedding


def predict(readout, embedding, x):
    with torch.no_grad():
        return readout(torch.as_tensor(embedding), torch.as_tensor(x)).numpy()


@pytest.mark.parametrize("n_classes", [2, 4])
def test_logistic_readout_is_logreg_when_the_embedding_says_nothing(n_classes):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 10)).astype(np.float32)
    y = (x[:, :n_classes].argmax(1) if n_classes > 2 else (x[:, 0] > 0)).astype(np.int64)
    readout, embedding = readout_with_constant_embedding(10, n_classes + 1, 120)  # one class never seen
    fit_logistic_readout(readout, readout_features(readout, embedding, x), y, n_classes + 1)
    ours = predict(readout, embedding, x)
    sk = LogisticRegression(C=1.0, max_iter=1000).fit(x, y)
    np.testing.assert_array_equal(ours.argmax(1), sk.predict(x))
    np.testing.assert_allclose(torch.softmax(torch.as_tensor(ours), -1).numpy()[:, :n_classes], sk.predict_proba(x),
                               atol=1e-5)
    assert (ours.argmax(1) != n_classes).all()  # the unseen class is never predicted


def test_ridge_readout_is_ridge_when_the_embedding_says_nothing():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 6)).astype(np.float32)
    y = x @ rng.normal(size=(6, 3)) + rng.normal(scale=0.1, size=(80, 3))
    readout, embedding = readout_with_constant_embedding(6, 3, 80)
    fit_ridge_readout(readout, readout_features(readout, embedding, x), y)
    np.testing.assert_allclose(predict(readout, embedding, x), RidgeCV(alphas=RIDGE_ALPHAS).fit(x, y).predict(x),
                               atol=1e-4)


def test_per_peak_logistic_readout_handles_constant_peaks():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = np.stack([x[:, 0] > 0, np.zeros(60, bool), np.ones(60, bool)], 1).astype(np.float32)
    readout, embedding = readout_with_constant_embedding(4, 3, 60)
    fit_per_feature_logistic_readout(readout, readout_features(readout, embedding, x), y)
    prob = torch.sigmoid(torch.as_tensor(predict(readout, embedding, x))).numpy()
    assert ((prob[:, 0] > 0.5) == (x[:, 0] > 0)).mean() > 0.9
    assert prob[:, 1].max() < 1e-3 and prob[:, 2].min() > 1 - 1e-3


def test_expression_path_projects_on_principal_components():
    path = ExpressionPath(5, 2)
    from atlasformer.finetune.expression import fit_expression_path

    x = np.random.default_rng(3).normal(size=(50, 5)).astype(np.float32)
    fit_expression_path(path, x)
    from sklearn.decomposition import PCA

    expected = PCA(2, random_state=0).fit_transform(x)
    np.testing.assert_allclose(np.abs(path(torch.as_tensor(x)).numpy()), np.abs(expected), atol=1e-4)


def test_expression_inputs_are_log_normalised_and_missing_genes_read_zero():
    adata = simulate_counts(n_cells=30, n_genes=40, seed=0)
    tokenizer = CellTokenizer(build_vocab([adata], gene_id_mode="raw"), TokenizerConfig(gene_id_mode="raw"))
    genes = [adata.var_names[3], "NOT_A_GENE", adata.var_names[7]]
    x = expression_inputs(adata, genes, tokenizer)
    full = log_normalize(sp.csr_matrix(adata.X)).toarray()
    np.testing.assert_allclose(x[:, [0, 2]], full[:, [3, 7]], rtol=1e-5)
    assert (x[:, 1] == 0).all()


def test_task_recipes_fill_only_what_the_user_left_unset():
    assert Annotator().config.mode == "frozen" and Annotator().config.readout == "linear"
    assert Annotator(config=FinetuneConfig(mode="full", expression_genes=0)).config.mode == "full"
    assert Annotator(config=FinetuneConfig(expression_genes=0)).config.expression_genes == 0
    assert Integrator().config.harmony is True and ModalityPredictor().config.expression_pcs == 50
    assert Imputer().config.epochs == 50 and FinetuneConfig().with_recipe({}).mode == "full"


def test_annotation_with_expression_path_saves_and_loads(tmp_path):
    adata = simulate_counts(n_cells=300, n_genes=200, n_cell_types=4, n_batches=2, seed=1)
    task = Annotator(None, scratch(expression_genes=100, val_fraction=0.3), labels_key="cell_type")
    metrics = task.fit(adata)
    assert task.model.expression_path is not None and len(task.model.config.expression_genes) == 100
    assert metrics["accuracy"] > 0.9
    task.save(tmp_path / "model")
    again = Annotator.load(tmp_path / "model")
    np.testing.assert_array_equal(again.predict(adata)["label"], task.predict(adata)["label"])


@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_every_task_runs_with_the_expression_path(mode, tmp_path):
    adata = simulate_counts(n_cells=240, n_genes=120, n_cell_types=3, n_batches=2, seed=2)
    cfg = scratch(mode=mode, expression_genes=60, expression_pcs=10, val_fraction=0.25)
    integ = Integrator(None, cfg, batch_key="batch")
    integ.fit(adata)
    emb = integ.embed(adata)
    assert emb.shape == (adata.n_obs, 10 + TINY["d_model"]) and np.isfinite(emb).all()
    imputer = Imputer(None, cfg)
    imputer.fit(adata)
    cp10k = imputer.predict(adata)
    np.testing.assert_allclose(np.nansum(cp10k, 1), 1e4, rtol=1e-3)
    protein = simulate_proteins(adata, n_proteins=5)
    predictor = ModalityPredictor(None, cfg, modality="protein")
    val = predictor.fit(adata, paired=protein)
    assert val["rmse"] < val["mean_baseline"]["rmse"]
    predictor.save(tmp_path / mode)
    again = ModalityPredictor.load(tmp_path / mode)
    np.testing.assert_allclose(again.predict(adata), predictor.predict(adata), atol=1e-5)


def test_frozen_embeddings_are_computed_once_per_cell_and_backbone(monkeypatch):
    from atlasformer.finetune import common
    from atlasformer.model_zoo import CellTransformer, CellTransformerConfig
    from atlasformer.tokenization import tokenize_anndata

    adata = simulate_counts(n_cells=50, n_genes=60, seed=4)
    tokenizer = CellTokenizer(build_vocab([adata], gene_id_mode="raw"), TokenizerConfig(gene_id_mode="raw", max_seq_len=32))
    cells = tokenize_anndata(adata, tokenizer).cells
    backbone = CellTransformer(CellTransformerConfig(vocab_size=len(tokenizer.vocab), d_model=16, n_layers=1, n_heads=2))
    expected = common.run_model(backbone, cells, tokenizer)
    calls = []
    real = common.run_model
    monkeypatch.setattr(common, "run_model", lambda *a, **k: calls.append(len(k.get("rows", []))) or real(*a, **k))
    np.testing.assert_allclose(common.frozen_embeddings(backbone, cells, tokenizer), expected, atol=1e-5)
    np.testing.assert_allclose(common.frozen_embeddings(backbone, cells, tokenizer), expected, atol=1e-5)
    assert calls == [50]  # the second call found every cell
    with torch.no_grad():
        backbone.embeddings.genes.weight.add_(1.0)  # other weights: computed again
    common.frozen_embeddings(backbone, cells, tokenizer)
    assert calls == [50, 50]


def shifted_batches(n_batches, n_per_batch=100, n_features=200, seed=0):
    """Two overlapping classes told apart by 5 of many features (so a fitted logistic regression is
    overconfident on new cells); every batch shifts all features by its own offset (a batch effect)."""
    rng = np.random.default_rng(seed)
    x, y, batch = [], [], []
    for b in range(n_batches):
        labels = rng.integers(0, 2, n_per_batch)
        means = np.where(labels[:, None] == 1, 0.6, -0.6) * (np.arange(n_features) < 5)
        x.append(means + rng.normal(size=(n_per_batch, n_features)) + rng.normal(scale=0.3, size=n_features))
        y.append(labels)
        batch.append(np.full(n_per_batch, b))
    return np.vstack(x), np.concatenate(y), np.concatenate(batch)


def test_out_of_fold_temperature_softens_confidence_on_a_new_batch():
    x, y, batch = shifted_batches(6)
    raw, calibrated = [], []
    for held_out in range(6):  # each batch in turn is the query, the others the reference
        reference, query = batch != held_out, batch == held_out
        temperature = out_of_fold_temperature(x[reference], y[reference], 2, groups=batch[reference])
        assert temperature > 1.5  # the held-out batches show the readout is overconfident, so it is softened
        weight, bias = logistic_weights(x[reference], y[reference], 2)
        logits = x[query] @ weight.T + bias  # (query cells, 2)
        correct = logits.argmax(1) == y[query]
        for scores, t in ((raw, 1.0), (calibrated, temperature)):
            probabilities = torch.softmax(torch.as_tensor(logits / t), -1).numpy()
            scores.append(expected_calibration_error(probabilities.max(1), correct))
    assert np.mean(calibrated) < 0.8 * np.mean(raw)
    # without batches the folds are random; the temperature never sharpens below 1
    assert out_of_fold_temperature(x[batch == 0], y[batch == 0], 2) >= 1.0


def test_cross_fitting_folds_are_batches_or_random_folds():
    """One fold maker for every calibration (mapping's kNN, the annotation classifier's temperature)."""
    by_batch, kind = cross_fitting_folds(np.array(["a"] * 5 + ["b"] * 15), 20)
    assert sorted(np.bincount(by_batch)) == [5, 15] and kind == "2 batches"
    random, kind = cross_fitting_folds(None, 20)
    assert kind == "5 random folds" and list(np.bincount(random)) == [4] * 5
    one_batch, kind = cross_fitting_folds(np.array(["a"] * 20), 20)  # one batch: random folds instead
    assert kind == "5 random folds" and np.array_equal(one_batch, random)
    many = np.repeat(np.arange(25), 4)  # 25 batches of 4 cells: 10 folds of whole batches
    folds, kind = cross_fitting_folds(many, 100)
    assert kind == "25 batches in 10 folds" and len(np.unique(folds)) == 10
    assert all(len(np.unique(folds[many == b])) == 1 for b in range(25))


def test_annotation_calibration_keeps_labels_and_records_its_temperature(tmp_path):
    # weak markers under strong batch effects: a readout fitted on two batches is overconfident on the third
    adata = simulate_counts(n_cells=300, n_genes=200, n_cell_types=4, n_batches=3, batch_sd=1.5, marker_lfc=1.0,
                            seed=3)
    tasks = {}
    for calibrate in (True, False):
        tasks[calibrate] = Annotator(None, scratch(expression_genes=100, calibrate=calibrate), labels_key="cell_type",
                                     batch_key="batch")
        tasks[calibrate].fit(adata)
    calibrated, raw = tasks[True].predict(adata), tasks[False].predict(adata)
    temperature = tasks[True].validation["temperature"]
    assert temperature > 1.5 and tasks[False].validation["temperature"] == 1.0
    np.testing.assert_array_equal(calibrated["label"], raw["label"])
    assert (calibrated["confidence"] <= raw["confidence"] + 1e-6).all()
    assert (calibrated["confidence"] < raw["confidence"] - 0.01).mean() > 0.1
    tasks[True].save(tmp_path / "model")  # the temperature is in the saved weights
    np.testing.assert_allclose(Annotator.load(tmp_path / "model").predict(adata)["confidence"], calibrated["confidence"],
                               atol=1e-5)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fine_tuning_from_the_closed_form_fit_validates_that_fit_first(mode, caplog):
    """mode=full / lora start from the closed-form readout, which is scored before the first step: fine-tuning
    that never beats it on validation returns it (tests/test_finetune_heads.py checks the fit loop itself)."""
    adata = simulate_counts(n_cells=200, n_genes=100, n_cell_types=3, n_batches=2, seed=4)
    cfg = scratch(mode=mode, expression_genes=50, expression_pcs=10, val_fraction=0.25, max_steps=2)
    with caplog.at_level("INFO", logger="atlasformer"):
        Annotator(None, cfg, labels_key="cell_type").fit(adata)
        ModalityPredictor(None, cfg, modality="protein").fit(adata, paired=simulate_proteins(adata, n_proteins=4))
    messages = [r.getMessage() for r in caplog.records]
    for metric in ("macro_f1", "rmse"):
        assert any(f"step 0: validation {metric}" in m for m in messages), caplog.text
