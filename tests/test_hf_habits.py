"""Hugging Face habits and provenance (issue 13, items 18-19): a model saved with ``save_pretrained`` loads back
with ``atlasformer.from_pretrained``; the config and model are registered with transformers' Auto classes;
model cards name the base model, the fine-tuning data and task, show usage and hold no absolute path;
``config.json`` carries ``label2id``; every key written into AnnData records its model, layer and settings in
``uns['atlasformer']``."""

import json

import anndata as ad
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel

import atlasformer
from atlasformer.checkpoints import CheckpointError, export_model_folder
from atlasformer.finetune import Annotator, FinetuneConfig, annotate, finetune_file
from atlasformer.model_zoo import CellTransformer, CellTransformerConfig, CellTransformerForPretraining
from atlasformer.tokenization import CellTokenizer, GeneVocab


@pytest.fixture
def model_folder(tmp_path, sim_adata):
    vocab = GeneVocab(list(sim_adata.var_names))
    config = CellTransformerConfig(vocab_size=len(vocab), d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                   pad_token_id=vocab.pad_id)
    torch.manual_seed(0)
    return export_model_folder(CellTransformerForPretraining(config), CellTokenizer(vocab), tmp_path / "m",
                               {"data": [str(tmp_path / "corpus.h5ad")]})


def test_save_pretrained_round_trips_through_from_pretrained(model_folder, tmp_path):
    model, tokenizer = atlasformer.from_pretrained(model_folder)
    model.save_pretrained(tmp_path / "saved")
    again, tokenizer_again = atlasformer.from_pretrained(tmp_path / "saved")
    assert tokenizer_again.vocab == tokenizer.vocab
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name

    bare = CellTransformerForPretraining(model.config)  # no tokenizer attached: the error says how to add it
    bare.save_pretrained(tmp_path / "bare")
    with pytest.raises(CheckpointError, match=r"tokenizer\.save_pretrained"):
        atlasformer.from_pretrained(tmp_path / "bare")
    tokenizer.save_pretrained(tmp_path / "bare")
    atlasformer.from_pretrained(tmp_path / "bare")


def test_auto_classes_load_the_backbone(model_folder):
    assert AutoConfig.from_pretrained(model_folder).model_type == CellTransformerConfig.model_type
    backbone = AutoModel.from_pretrained(model_folder)
    assert isinstance(backbone, CellTransformer)
    model, _ = atlasformer.from_pretrained(model_folder)
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, backbone.state_dict()[name]), name


def test_fine_tuned_card_config_and_provenance(model_folder, tmp_path, sim_adata):
    data = tmp_path / "inputs" / "cells.h5ad"
    data.parent.mkdir()
    sim_adata.write_h5ad(data)
    config = FinetuneConfig(max_seq_len=32, epochs=1)
    finetune_file(Annotator(model_folder, config, labels_key="cell_type"), data, tmp_path / "out")
    folder = tmp_path / "out" / "model"
    card = (folder / "README.md").read_text()
    assert "base_model: " in card and "- task: annotation" in card and "cells.h5ad" in card
    assert "## Usage" in card and "annotate(adata, MODEL)" in card
    assert str(tmp_path) not in card  # no absolute local path
    saved = json.loads((folder / "config.json").read_text())
    assert saved["label2id"] == {label: int(i) for i, label in saved["id2label"].items()}

    out = ad.read_h5ad(tmp_path / "out" / "cells.h5ad")
    record = out.uns["atlasformer"]["obs"]["atlasformer_label"]
    assert record["model"] == str(model_folder) and record["layer"] == "X" and len(record["manifest_sha256"]) == 64
    assert json.loads(record["settings"])["epochs"] == 1

    query = sim_adata.copy()
    annotate(query, folder)
    assert set(query.uns["atlasformer"]["obs"]) == {"atlasformer_label", "atlasformer_confidence"}
    atlasformer.embed(query, model_folder)
    assert query.uns["atlasformer"]["obsm"]["X_atlasformer"]["model"] == str(model_folder)
    assert np.isfinite(query.obsm["X_atlasformer"]).all()
