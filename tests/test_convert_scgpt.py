"""scGPT converter: a checkpoint saved in scGPT's format (best_model.pt + vocab.json + args.json) from PyPI
scgpt's own TransformerModel converts into an atlasformer folder that gives the same cell embeddings,
expression predictions and MVC predictions; it loads by hub id offline and fine-tunes on real data."""

import importlib.util
import json
import os
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from hub_cache import add_to_hub_cache, hub_cache  # noqa: F401  (fixture)

import atlasformer
from atlasformer.checkpoints import CheckpointError, convert_scgpt, load_model_folder, resolve_model
from atlasformer.checkpoints import scgpt as scgpt_module
from atlasformer.cli import main
from atlasformer.finetune import Annotator, FinetuneConfig
from atlasformer.tokenization import read_h5ad

SYMBOLS = ["CD3D", "CD3E", "MS4A1", "CD14", "LYZ", "NKG7", "GNLY", "CD8A", "FCGR3A", "PPBP", "NOT_A_GENE_1", "NOT_A_GENE_2"]
ARGS = {"embsize": 32, "nheads": 4, "d_hid": 64, "nlayers": 2, "n_layers_cls": 3, "dropout": 0.2, "pad_token": "<pad>",
        "pad_value": -2, "mask_value": -1, "n_bins": 51, "max_seq_len": 1201, "input_emb_style": "continuous"}


@pytest.fixture(scope="module")
def scgpt_model_class():
    """scgpt.model.TransformerModel from PyPI scgpt 0.2.4 (installed --no-deps).

    Its package imports torchtext (which cannot load with this torch) and IPython at import time; small
    stand-ins are placed in sys.modules for the import only. The model code itself is scGPT's.
    """
    if importlib.util.find_spec("scgpt") is None:
        message = "PyPI scgpt is not installed (scripts/setup.sh installs it: pip install --no-deps scgpt==0.2.4)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    torchtext, vocab = types.ModuleType("torchtext"), types.ModuleType("torchtext.vocab")
    vocab.Vocab = type("Vocab", (), {})
    vocab.build_vocab_from_iterator = lambda *a, **k: None
    torchtext.vocab = vocab
    stand_ins = {"torchtext": torchtext, "torchtext.vocab": vocab}
    if importlib.util.find_spec("IPython") is None:
        stand_ins["IPython"] = types.SimpleNamespace(get_ipython=lambda: None)
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from scgpt.model import TransformerModel
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return TransformerModel


def scgpt_vocab(genes):
    vocab = {g: i for i, g in enumerate(genes)}
    for special in ("<pad>", "<cls>", "<eoc>"):
        vocab[special] = len(vocab)
    return vocab


def save_scgpt_checkpoint(model_class, folder, genes, *, seed=0, flash_names=False):
    """A randomly initialised scGPT model saved as scGPT saves one; returns (model, vocab)."""
    vocab = scgpt_vocab(genes)
    torch.manual_seed(seed)
    model = model_class(len(vocab), ARGS["embsize"], ARGS["nheads"], ARGS["d_hid"], ARGS["nlayers"], nlayers_cls=3,
                        n_cls=1, vocab=vocab, dropout=ARGS["dropout"], pad_token="<pad>", pad_value=-2, do_mvc=True,
                        input_emb_style="continuous", n_input_bins=51, cell_emb_style="cls", use_fast_transformer=False)
    with torch.no_grad():  # every weight random, LayerNorms included, so a wrong mapping shows
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    state = model.state_dict()
    if flash_names:  # flash-attention checkpoints name the fused projection Wqkv
        state = {k.replace("self_attn.in_proj_", "self_attn.Wqkv."): v for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "best_model.pt")
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "args.json").write_text(json.dumps(ARGS))
    return model.eval(), vocab


def scgpt_batch(vocab, n_genes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n_genes, (4, 14), generator=g)
    ids[:, 0] = vocab["<cls>"]
    values = torch.randint(0, 51, (4, 14), generator=g).float()
    values[:, 0] = 0
    values[1, 3:6] = -1  # scGPT's mask value
    pad = torch.zeros(4, 14, dtype=torch.bool)
    pad[2, 9:] = pad[3, 5:] = True
    ids[pad], values[pad] = vocab["<pad>"], -2  # scGPT's pad value
    return ids, values, pad


@pytest.mark.parametrize("flash_names", [False, True], ids=["in_proj", "Wqkv"])
def test_converted_model_matches_scgpt(scgpt_model_class, tmp_path, flash_names):
    reference, vocab = save_scgpt_checkpoint(scgpt_model_class, tmp_path / "scgpt", SYMBOLS, flash_names=flash_names)
    ours, tokenizer = load_model_folder(convert_scgpt(tmp_path / "scgpt", tmp_path / "converted"))
    ids, values, pad = scgpt_batch(vocab, len(SYMBOLS))
    with torch.no_grad():
        ref = reference(ids, values, pad, MVC=True)
        out = ours(ids, values, ~pad)
    real = ~pad
    torch.testing.assert_close(out.cell_embedding, ref["cell_emb"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits[real], ref["mlm_output"][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.extras["mvc_values"][real], ref["mvc_output"][real], atol=1e-5, rtol=0)
    assert ref["cell_emb"].abs().mean() > 0.05  # outputs are not trivially zero


def test_tokenizer_and_config_are_scgpts(scgpt_model_class, tmp_path):
    _, vocab = save_scgpt_checkpoint(scgpt_model_class, tmp_path / "scgpt", SYMBOLS)
    folder = convert_scgpt(tmp_path / "scgpt", tmp_path / "converted")
    model, tokenizer = load_model_folder(folder)
    cfg = tokenizer.config
    assert (cfg.kind, cfg.n_bins, cfg.max_seq_len, cfg.gene_id_mode) == ("binned", 51, 1200, "resolve")
    assert set(cfg.special_tokens) == {"<pad>", "<cls>", "<eoc>"}
    ids = tokenizer.vocab.token_to_id
    assert all(ids[s] == vocab[s] for s in ("<pad>", "<cls>", "<eoc>"))
    # symbols become canonical keys (Ensembl IDs) with their scGPT ids; unknown names stay as given
    assert ids["ENSG00000167286"] == vocab["CD3D"] and ids["NOT_A_GENE_1"] == vocab["NOT_A_GENE_1"]
    mc = model.config
    assert (mc.value_encoding, mc.norm_first, mc.activation, mc.pooling, mc.mask_value) == ("continuous", False, "relu", "cls", -1.0)
    assert (mc.pad_token_id, mc.cls_token_id, mc.embedding_dropout) == (vocab["<pad>"], vocab["<cls>"], "values")
    card = (folder / "README.md").read_text()
    assert "Converted by atlasformer from a scgpt checkpoint" in card and "best_model.pt" in card
    assert "cls_decoder._decoder.0.weight" in card  # dropped weights are listed


def test_unsupported_scgpt_checkpoints_are_refused(scgpt_model_class, tmp_path):
    save_scgpt_checkpoint(scgpt_model_class, tmp_path / "s", SYMBOLS)
    state = torch.load(tmp_path / "s" / "best_model.pt", weights_only=True)
    torch.save({**state, "dsbn.bns.0.weight": torch.ones(32)}, tmp_path / "s" / "best_model.pt")
    with pytest.raises(CheckpointError, match="domain-specific batch norm"):
        convert_scgpt(tmp_path / "s", tmp_path / "out")
    (tmp_path / "s" / "args.json").write_text(json.dumps({**ARGS, "input_emb_style": "category"}))
    with pytest.raises(CheckpointError, match="input_emb_style='category'"):
        convert_scgpt(tmp_path / "s", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_on_the_fly_conversion_is_cached_and_loads_by_hub_id(scgpt_model_class, tmp_path, hub_cache, monkeypatch):  # noqa: F811
    _, vocab = save_scgpt_checkpoint(scgpt_model_class, tmp_path / "repo" / "whole_human", SYMBOLS)
    add_to_hub_cache(hub_cache, "bowang-lab/scGPT-tiny", tmp_path / "repo")
    model, tokenizer = atlasformer.from_pretrained("bowang-lab/scGPT-tiny", subfolder="whole_human")
    first = resolve_model("bowang-lab/scGPT-tiny", subfolder="whole_human")
    assert first.parent == hub_cache.parent / "atlasformer-converted" and first.name.startswith("scgpt-")

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(scgpt_module, "convert_scgpt_folder", no_second_conversion)
    again, _ = atlasformer.from_pretrained("bowang-lab/scGPT-tiny", subfolder="whole_human")
    assert torch.equal(again.backbone.embeddings.genes.weight, model.backbone.embeddings.genes.weight)
    assert len(tokenizer.vocab) == len(vocab)
    # the cache is keyed by content: the same files as a local folder hit the same entry
    assert resolve_model(tmp_path / "repo", subfolder="whole_human") == first


def test_cli_convert_scgpt(scgpt_model_class, tmp_path, capsys):
    save_scgpt_checkpoint(scgpt_model_class, tmp_path / "scgpt", SYMBOLS)
    assert main(["convert", "scgpt", str(tmp_path / "scgpt"), str(tmp_path / "out")]) == 0
    assert "2 layers, d_model 32" in capsys.readouterr().out
    assert main(["convert", "scgpt", str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2


@pytest.mark.shared_data
def test_converted_scgpt_embeds_and_fine_tunes_on_kang(scgpt_model_class, tmp_path, shared_data, hub_cache):  # noqa: F811
    adata = read_h5ad(shared_data("kang_pbmc_8donors.h5ad"), backed=False)
    adata = adata[np.random.default_rng(0).choice(adata.n_obs, 400, replace=False)].copy()
    symbols = list(adata.var["gene_symbol"].astype(str))  # scGPT vocabularies are keyed by symbol
    save_scgpt_checkpoint(scgpt_model_class, tmp_path / "repo", symbols)
    add_to_hub_cache(hub_cache, "bowang-lab/scGPT-kang", tmp_path / "repo")

    emb = atlasformer.embed(adata, "bowang-lab/scGPT-kang", copy=True).obsm["X_atlasformer"]
    assert emb.shape == (400, 32) and (np.abs(emb).sum(1) > 0).mean() > 0.99  # Ensembl var_names matched symbols

    cfg = FinetuneConfig(max_steps=8, batch_size=16, lr=1e-3, max_seq_len=128, val_fraction=0.2)
    annotator = Annotator("bowang-lab/scGPT-kang", cfg, labels_key="cell_type")
    metrics = annotator.fit(adata)
    assert metrics["n_val"] == 80 and 0 <= metrics["accuracy"] <= 1
    folder = annotator.save(tmp_path / "finetuned")
    labels = sorted(adata.obs["cell_type"].astype(str).unique())
    reloaded = Annotator.load(folder)
    assert [reloaded.model.config.id2label[i] for i in range(len(labels))] == labels
    assert set(reloaded.predict(adata)["label"]) <= set(labels)
