"""Geneformer converter: a transformers BertForMaskedLM folder plus its token dictionary and gene-median
pickles converts into an atlasformer folder with a rank-value tokenizer whose logits and embeddings equal
BERT's; it loads by hub id (with subfolder) offline and fine-tunes on real data."""

import json
import pickle

import numpy as np
import pytest
import torch
from hub_cache import add_to_hub_cache, hub_cache  # noqa: F401  (fixture)
from transformers import BertConfig, BertForMaskedLM

import atlasformer
from atlasformer.checkpoints import (
    CheckpointError,
    convert_geneformer,
    detect_format,
    load_model_folder,
    resolve_model,
)
from atlasformer.cli import main
from atlasformer.finetune import Annotator, FinetuneConfig
from atlasformer.tokenization import read_h5ad

SPECIALS_V2 = ["<pad>", "<mask>", "<cls>", "<eos>"]
SPECIALS_V1 = ["<pad>", "<mask>"]


def write_pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=4))


def make_geneformer_repo(root, genes, *, specials=SPECIALS_V2, subfolder="gf-2L-test", seed=0, bin_weights=False):
    """A Geneformer-like repository: a random BertForMaskedLM in ``subfolder`` and dictionaries under geneformer/.

    Dictionary values are numpy scalars, as Geneformer's pickles hold; a second dictionary of another
    size is a decoy that the converter must not pick.
    """
    tokens = {t: np.int64(i) for i, t in enumerate([*specials, *genes])}
    config = BertConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_act="relu", pad_token_id=0,
                        layer_norm_eps=1e-12)
    torch.manual_seed(seed)
    model = BertForMaskedLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    model.eval()
    folder = root / subfolder if subfolder else root
    model.save_pretrained(folder)
    if bin_weights:  # legacy transformers folders: pytorch_model.bin (loaded weights-only)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    write_pickle(root / "geneformer" / "token_dictionary_gcTEST.pkl", tokens)
    write_pickle(root / "geneformer" / "gene_median_dictionary_gcTEST.pkl",
                 {g: np.float64(0.5 + (i % 7)) for i, g in enumerate(genes)})
    write_pickle(root / "geneformer" / "old" / "token_dictionary_gcOLD.pkl", {"<pad>": 0, "<mask>": 1, "ENSG00000000001": 2})
    write_pickle(root / "geneformer" / "old" / "gene_median_dictionary_gcOLD.pkl", {"ENSG00000000001": 1.0})
    return model, {k: int(v) for k, v in tokens.items()}


GENES = [f"ENSG{i:011d}" for i in range(100, 140)]


def test_converted_model_matches_bert(tmp_path):
    reference, tokens = make_geneformer_repo(tmp_path / "repo", GENES)
    assert detect_format(tmp_path / "repo" / "gf-2L-test") == "geneformer"
    ours, tokenizer = load_model_folder(convert_geneformer(tmp_path / "repo", tmp_path / "out", subfolder="gf-2L-test"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(tokens), (3, 12), generator=g)
    ids[:, 0] = tokens["<cls>"]
    attention = torch.ones(3, 12, dtype=torch.long)
    attention[1, 7:] = 0
    ids[1, 7:] = tokens["<pad>"]
    with torch.no_grad():
        ref = reference(input_ids=ids, attention_mask=attention, output_hidden_states=True)
        out = ours(ids, attention_mask=attention.bool())
    real = attention.bool()
    torch.testing.assert_close(out.extras["gene_logits"][real], ref.logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.hidden_states[real], ref.hidden_states[-1][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.cell_embedding, ref.hidden_states[-1][:, 0], atol=1e-5, rtol=0)
    assert ref.logits.abs().mean() > 0.05
    # the rank-value tokenizer: Geneformer's dictionary, its medians, positions minus the <cls>
    cfg = tokenizer.config
    assert (cfg.kind, cfg.max_seq_len, cfg.target_sum) == ("rank", 63, 1e4)
    assert tokenizer.vocab.token_to_id == tokens and tokenizer.gene_medians[GENES[3]] == 3.5


def test_legacy_bin_weights_and_v1_dictionaries(tmp_path):
    genes = GENES[:20]
    reference, tokens = make_geneformer_repo(tmp_path / "repo", genes, specials=SPECIALS_V1, subfolder="", bin_weights=True)
    ours, tokenizer = load_model_folder(convert_geneformer(tmp_path / "repo", tmp_path / "out"))
    vocab = tokenizer.vocab
    # V1 has no <cls>: one is appended (never predicted), and the cell embedding is the mean over genes
    assert vocab.cls_id == len(tokens) and ours.config.vocab_size == len(tokens) + 1 and ours.config.pooling == "mean"
    words = reference.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(ours.backbone.embeddings.genes.weight[: len(tokens)], words, atol=0, rtol=0)
    ids = torch.tensor([[vocab.cls_id, *range(2, 12)]])
    with torch.no_grad():
        logits = ours(ids, attention_mask=torch.ones_like(ids, dtype=torch.bool)).extras["gene_logits"]
    assert (logits.argmax(-1) != vocab.cls_id).all()


def test_missing_dictionaries_and_foreign_configs_are_clear_errors(tmp_path):
    make_geneformer_repo(tmp_path / "repo", GENES)
    with pytest.raises(CheckpointError, match="no Geneformer token dictionary.*44 tokens"):
        convert_geneformer(tmp_path / "repo" / "gf-2L-test", tmp_path / "out")  # dictionaries live above it
    config = json.loads((tmp_path / "repo" / "gf-2L-test" / "config.json").read_text())
    (tmp_path / "repo" / "gf-2L-test" / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu_new"}))
    with pytest.raises(CheckpointError, match="hidden_act='gelu_new'"):
        convert_geneformer(tmp_path / "repo", tmp_path / "out", subfolder="gf-2L-test")
    with pytest.raises(CheckpointError, match="not a model folder atlasformer can load"):
        detect_format(tmp_path / "repo" / "geneformer")


def test_loads_by_hub_id_with_subfolder_offline_and_cli_convert(tmp_path, hub_cache, capsys):  # noqa: F811
    make_geneformer_repo(tmp_path / "repo", GENES)
    add_to_hub_cache(hub_cache, "ctheodoris/Geneformer-tiny", tmp_path / "repo")
    model, tokenizer = atlasformer.from_pretrained("ctheodoris/Geneformer-tiny", subfolder="gf-2L-test")
    assert model.config.gene_head and tokenizer.config.kind == "rank"
    out = tmp_path / "converted"
    assert main(["convert", "geneformer", "ctheodoris/Geneformer-tiny", str(out), "--subfolder", "gf-2L-test"]) == 0
    assert "rank tokenizer" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "Converted by atlasformer from a geneformer checkpoint: `ctheodoris/Geneformer-tiny`" in card
    assert "geneformer/token_dictionary_gcTEST.pkl" in card and "license: apache-2.0" in card


@pytest.mark.shared_data
def test_converted_geneformer_fine_tunes_on_kang(tmp_path, shared_data, hub_cache):  # noqa: F811
    adata = read_h5ad(shared_data("kang_pbmc_8donors.h5ad"), backed=False)
    adata = adata[np.random.default_rng(1).choice(adata.n_obs, 400, replace=False)].copy()
    make_geneformer_repo(tmp_path / "repo", list(adata.var_names))  # Geneformer keys genes by Ensembl ID
    add_to_hub_cache(hub_cache, "ctheodoris/Geneformer-kang", tmp_path / "repo")
    source = {"subfolder": "gf-2L-test"}

    emb = atlasformer.cell_embeddings(adata, atlasformer.from_pretrained("ctheodoris/Geneformer-kang", **source))
    assert emb.shape == (400, 32) and (np.abs(emb).sum(1) > 0).mean() > 0.99

    cfg = FinetuneConfig(max_steps=8, batch_size=16, lr=1e-3, max_seq_len=63, val_fraction=0.2)
    annotator = Annotator(resolve_model("ctheodoris/Geneformer-kang", **source), cfg, labels_key="cell_type")
    metrics = annotator.fit(adata)
    assert metrics["n_val"] == 80 and 0 <= metrics["macro_f1"] <= 1
    reloaded = Annotator.load(annotator.save(tmp_path / "finetuned"))
    assert reloaded.tokenizer.config.kind == "rank" and reloaded.tokenizer.gene_medians
    assert set(reloaded.predict(adata)["label"]) <= set(adata.obs["cell_type"].astype(str))
