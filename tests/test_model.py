"""CellTransformer: shapes, padding invariance, save/load round trips (model folder with tokenizer)."""

import json

import numpy as np
import pytest
import torch

from atlasformer.checkpoints import CheckpointError, export_model_folder, load_model_folder, read_manifest
from atlasformer.model_zoo import (
    CellTransformerConfig,
    CellTransformerForAnnotation,
    CellTransformerForPretraining,
)
from atlasformer.tokenization import CellTokenizer, GeneVocab, TokenizerConfig


def tiny(**kw):
    return CellTransformerConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, n_bins=11, dropout=0.0, **kw)


def batch(seed=0, b=3, s=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (b, s), generator=g)
    ids[:, 0] = 1
    values = torch.randint(1, 11, (b, s), generator=g).float()
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, 6:] = False
    ids[0, 6:] = 0
    return ids, values, mask


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("value_encoding", ["category", "continuous"])
def test_shapes_and_padding_invariance(norm_first, value_encoding):
    model = CellTransformerForPretraining(tiny(norm_first=norm_first, value_encoding=value_encoding)).eval()
    ids, values, mask = batch()
    out = model(ids, values, mask)
    assert out.logits.shape == (3, 9, 11) and out.cell_embedding.shape == (3, 32)
    # the first cell alone, without its padding, gives the same embedding
    alone = model(ids[:1, :6], values[:1, :6], mask[:1, :6])
    torch.testing.assert_close(alone.cell_embedding, out.cell_embedding[:1], atol=1e-5, rtol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        CellTransformerConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="activation"):
        CellTransformerConfig(activation="tanh")


def test_masked_losses_only_count_targets():
    model = CellTransformerForPretraining(tiny(mvc_head=True)).eval()
    ids, values, mask = batch()
    targets = torch.zeros_like(mask)
    targets[:, 2] = True
    out = model(ids, values, mask, value_targets=values, target_mask=targets)
    assert set(out.loss_terms) == {"masked_value", "mvc"}
    summed = model(ids, values, mask, value_targets=values, target_mask=targets, loss_normalizer=1.0)
    torch.testing.assert_close(summed.loss_terms["masked_value"], out.loss_terms["masked_value"] * 3)


def test_model_folder_round_trip_gives_identical_outputs(tmp_path):
    vocab = GeneVocab([f"G{i}" for i in range(37)])
    tokenizer = CellTokenizer(vocab, TokenizerConfig(n_bins=11, max_seq_len=8))
    model = CellTransformerForPretraining(tiny()).eval()
    folder = export_model_folder(model, tokenizer, tmp_path / "model", {"note": "test"})
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "tokenizer_config.json", "atlasformer.json", "README.md"} <= names
    manifest = read_manifest(folder)
    assert manifest["format_version"] == 1 and "model.safetensors" in manifest["files"]
    loaded, loaded_tok = load_model_folder(folder)
    ids, values, mask = batch()
    torch.testing.assert_close(loaded(ids, values, mask).logits, model(ids, values, mask).logits, atol=0, rtol=0)
    assert loaded_tok.vocab == vocab and loaded_tok.config == tokenizer.config


def test_annotation_folder_keeps_labels(tmp_path):
    vocab = GeneVocab([f"G{i}" for i in range(37)])
    model = CellTransformerForAnnotation(tiny(id2label={0: "B cell", 1: "T cell"})).eval()
    tokenizer = CellTokenizer(vocab, TokenizerConfig(n_bins=model.config.n_bins))  # the tokenizer it was built for
    folder = export_model_folder(model, tokenizer, tmp_path / "ann", {})
    loaded, _ = load_model_folder(folder)
    assert isinstance(loaded, CellTransformerForAnnotation)
    assert loaded.config.id2label == {0: "B cell", 1: "T cell"}
    assert "T cell" in (folder / "README.md").read_text()


def test_tampered_and_mismatched_folders_are_refused(tmp_path):
    vocab = GeneVocab([f"G{i}" for i in range(37)])
    folder = export_model_folder(CellTransformerForPretraining(tiny()), CellTokenizer(vocab), tmp_path / "m", {})
    (folder / "vocab.json").write_text(json.dumps({"<pad>": 0, "<cls>": 1, "G0": 2}))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_model_folder(folder)
    with pytest.raises(CheckpointError, match="does not belong"):
        load_model_folder(folder, verify=False)


def test_vocab_round_trip(tmp_path):
    vocab = GeneVocab(["B", "A", "C"], specials=("<pad>", "<cls>", "<mask>", "<eoc>"))
    vocab.save(tmp_path)
    again = GeneVocab.load(tmp_path)
    assert again == vocab and again.genes == ["B", "A", "C"] and "<eoc>" in again.specials
    assert list(again.lookup(["C", "zzz", "<cls>"])) == [6, -1, -1]
    assert np.array_equal(vocab.lookup(["A"]), [5])
