"""One source for the model settings a tokenizer decides (vocabulary, special ids, value encoding, bins,
positions): derived by ``config_for_tokenizer``, checked whenever a model meets a tokenizer, and a corpus whose
tokenizer differs from the config's is a printed, recorded decision."""

from __future__ import annotations

import dataclasses

import pytest

from atlasformer.model_zoo.from_tokenizer import config_for_tokenizer, tokenizer_mismatches
from atlasformer.pretrain.config import PretrainConfig
from atlasformer.pretrain.train import adopt_corpus_tokenizer
from atlasformer.tokenization import CellTokenizer, InputError, TokenizerConfig, build_vocab


def tokenizer_of(sim_adata, **fields) -> CellTokenizer:
    vocab = build_vocab([sim_adata], gene_id_mode="raw")
    medians = dict.fromkeys(vocab.genes, 1.0) if fields.get("kind") == "rank" else None
    return CellTokenizer(vocab, TokenizerConfig(gene_id_mode="raw", **fields), medians)


def test_the_tokenizer_decides_vocabulary_ids_values_and_positions(sim_adata):
    binned = tokenizer_of(sim_adata, n_bins=21, max_seq_len=64)
    config = config_for_tokenizer(binned, d_model=16, n_layers=1, n_heads=2)
    assert (config.vocab_size, config.n_bins, config.value_encoding) == (len(binned.vocab), 21, "category")
    assert (config.pad_token_id, config.cls_token_id) == (binned.vocab.pad_id, binned.vocab.cls_id)
    assert config.max_position_embeddings == 0 and tokenizer_mismatches(config, binned) == []
    rank = tokenizer_of(sim_adata, kind="rank", max_seq_len=64)
    assert config_for_tokenizer(rank).max_position_embeddings == 65


def test_a_model_setting_that_contradicts_the_tokenizer_is_named(sim_adata):
    binned = tokenizer_of(sim_adata, n_bins=21)
    with pytest.raises(ValueError, match="21 bins but the model embeds 51"):
        config_for_tokenizer(binned, n_bins=51)
    with pytest.raises(ValueError, match="binned values"):
        config_for_tokenizer(binned, value_encoding="none")
    assert config_for_tokenizer(binned, value_encoding="continuous")  # scGPT reads bin ids as numbers
    rank = tokenizer_of(sim_adata, kind="rank", max_seq_len=64)
    with pytest.raises(ValueError, match="64 genes per cell .* exceed the model's 33 positions"):
        config_for_tokenizer(rank, max_position_embeddings=33)


def test_a_model_and_another_tokenizer_are_told_apart(sim_adata):
    config = config_for_tokenizer(tokenizer_of(sim_adata, n_bins=21))
    problems = tokenizer_mismatches(config, tokenizer_of(sim_adata, n_bins=11))
    assert problems == ["the tokenizer writes 11 bins but the model embeds 21"]
    longer = tokenizer_of(sim_adata, kind="rank", max_seq_len=128)
    assert "128 genes per cell" in " ".join(tokenizer_mismatches(config_for_tokenizer(tokenizer_of(
        sim_adata, kind="rank", max_seq_len=64)), longer))


def test_a_corpus_tokenizer_other_than_the_config_s_is_a_stated_decision(sim_adata, tmp_path):
    cfg = PretrainConfig(data=(str(tmp_path / "corpus"),), output=str(tmp_path / "run"),
                         tokenizer=TokenizerConfig(max_seq_len=512))
    corpus_tokenizer = tokenizer_of(sim_adata, kind="rank", max_seq_len=256)
    adopted, decision = adopt_corpus_tokenizer(cfg, corpus_tokenizer)
    assert adopted.tokenizer == corpus_tokenizer.config
    assert adopted.objectives == {"masked_gene": 1.0}  # the rank default, not the binned one
    assert "kind rank (the config asks binned)" in decision and "max_seq_len 256 (the config asks 512)" in decision
    assert "objectives {'masked_gene': 1.0}" in decision
    same = dataclasses.replace(cfg, tokenizer=corpus_tokenizer.config)
    assert adopt_corpus_tokenizer(same, corpus_tokenizer)[1] == ""
    explicit = dataclasses.replace(cfg, objectives={"mvc": 1.0})
    with pytest.raises(InputError, match="holds rank tokens"):
        adopt_corpus_tokenizer(explicit, corpus_tokenizer)


def test_loading_checks_the_tokenizer_against_the_model_not_only_the_vocabulary_size(sim_adata, tmp_path):
    import json
    import warnings

    from atlasformer.checkpoints import CheckpointError, export_model_folder, load_model_folder
    from atlasformer.model_zoo import CellTransformerForPretraining

    tokenizer = tokenizer_of(sim_adata, n_bins=21, max_seq_len=32)
    model = CellTransformerForPretraining(config_for_tokenizer(tokenizer, d_model=16, n_layers=1, n_heads=2))
    folder = export_model_folder(model, tokenizer, tmp_path / "model", {})
    load_model_folder(folder)  # fits
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "n_bins": 11}))  # same vocabulary size
    with warnings.catch_warnings(), pytest.raises(CheckpointError, match="writes 11 bins but the model embeds 21"):
        warnings.simplefilter("ignore")
        load_model_folder(folder, verify=False)  # past the checksums, as a hand-edited folder would be


def test_fine_tuning_has_one_genes_per_cell_setting(sim_adata):
    from atlasformer.finetune import FinetuneConfig
    from atlasformer.finetune.common import SCRATCH_GENES_PER_CELL, load_backbone

    with pytest.raises(ValueError, match="genes per cell is max_seq_len=64 in fine-tuning"):
        FinetuneConfig(tokenizer=TokenizerConfig(max_seq_len=64))
    scratch = dict(from_scratch=True, tokenizer=TokenizerConfig(gene_id_mode="raw"))
    _, tokenizer, _ = load_backbone(None, FinetuneConfig(**scratch), [sim_adata])
    assert tokenizer.config.max_seq_len == SCRATCH_GENES_PER_CELL
    _, tokenizer, config = load_backbone(None, FinetuneConfig(**scratch, max_seq_len=48), [sim_adata])
    assert tokenizer.config.max_seq_len == 48 and not tokenizer_mismatches(config, tokenizer)
