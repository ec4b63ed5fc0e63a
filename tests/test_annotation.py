"""Annotation fine-tuning: held-out batch of a real file, outputs written, input untouched."""

import hashlib

import anndata as ad
import numpy as np
import pytest

from atlasformer.finetune import Annotator, FinetuneConfig, annotate, finetune_file
from atlasformer.tokenization import InputError


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.shared_data
def test_cellbench_heldout_batch_macro_f1(tmp_path, shared_data):
    data = shared_data("cellbench_lung_lines_5batches.h5ad")
    before = digest(data)
    batches = ad.read_h5ad(data, backed="r").obs["batch"].value_counts()
    held_out = batches.index[0]  # the largest batch
    cfg = FinetuneConfig(from_scratch=True, scratch_model={"d_model": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.0},
                         max_seq_len=256, epochs=4, batch_size=32, lr=3e-3, head_lr=3e-3,
                         val_batch=str(held_out), patience=6, seed=0)
    task = Annotator(None, cfg, labels_key="cell_line", batch_key="batch")
    summary = finetune_file(task, data, tmp_path / "out")
    val = summary["validation"]
    assert val["macro_f1"] >= 0.9, val
    assert val["n_val"] == int(batches.iloc[0])
    assert set(val["per_class"]) and all("precision" in v for v in val["per_class"].values())
    out = ad.read_h5ad(tmp_path / "out" / "cellbench_lung_lines_5batches.h5ad")
    assert {"atlasformer_label", "atlasformer_confidence"} <= set(out.obs.columns) and out.X is None
    assert ((out.obs["atlasformer_confidence"] > 0) & (out.obs["atlasformer_confidence"] <= 1)).all()
    assert (tmp_path / "out" / "confusion_matrix.png").stat().st_size > 1000
    assert digest(data) == before  # the input file is never modified

    # the saved fine-tuned folder predicts the same labels, and the threshold yields "unknown"
    again = Annotator.load(tmp_path / "out" / "model")
    query = ad.read_h5ad(data)[:200].copy()
    pred = again.predict(query)
    np.testing.assert_array_equal(pred["label"].to_numpy(), out.obs["atlasformer_label"].to_numpy()[:200].astype(str))
    annotate(query, again, unknown_threshold=0.999999)
    assert (query.obs["atlasformer_label"] == "unknown").any()


def test_annotation_needs_labels_and_two_classes(sim_adata):
    task = Annotator(None, FinetuneConfig(from_scratch=True), labels_key="nope")
    with pytest.raises(InputError, match="labels_key='nope'"):
        task.fit(sim_adata)
    one_class = sim_adata.copy()
    one_class.obs["one"] = "x"
    with pytest.raises(InputError, match="at least 2"):
        Annotator(None, FinetuneConfig(from_scratch=True), labels_key="one").fit(one_class)
