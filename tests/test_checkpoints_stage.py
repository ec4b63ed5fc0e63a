"""Model folders have one home, atlasformer.checkpoints (issue 15, items 1 and 4): every path that writes one
(pretraining, a fine-tuned task, the scVI wrapper, the scGPT and Geneformer converters) goes through its writer,
and the folder loads through its one reader with the manifest checked, so a changed byte is refused. Weights are
matched to a module by one strict check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_convert_geneformer import GENES, make_geneformer_repo
from test_convert_scgpt import SYMBOLS, save_scgpt_checkpoint, scgpt_model_class  # noqa: F401  (fixture)

import atlasformer
from atlasformer.checkpoints import (
    CheckpointError,
    convert_geneformer,
    convert_scgpt,
    load_model,
    load_model_folder,
    load_state_dict_strict,
    load_vae_folder,
    push_model_folder,
    read_manifest,
    write_manifest,
)
from atlasformer.finetune import Annotator, FinetuneConfig, SCVIModel
from atlasformer.model_zoo import CellTransformerForAnnotation, CellTransformerForPretraining, SCVIModule
from atlasformer.pretrain import PretrainConfig, train
from atlasformer.tokenization import TokenizerConfig

TAMPERED = r"model\.safetensors does not match its SHA-256"


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def assert_one_reader_checks_the_manifest(folder: Path, model_class: type) -> None:
    """The folder loads through checkpoints.load_model with every file verified; one changed byte is refused."""
    manifest = read_manifest(folder, verify=True)
    assert {"config.json", "model.safetensors", "README.md"} <= set(manifest["files"])
    assert isinstance(load_model(folder), model_class)
    flip_last_byte(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=TAMPERED):
        load_model(folder)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, sim_adata):
    """The model folder a tiny pretraining run exports."""
    root = tmp_path_factory.mktemp("pretrain")
    sim_adata.write_h5ad(root / "sim.h5ad")
    cfg = PretrainConfig(data=(str(root / "sim.h5ad"),), output=str(root / "run"),
                         model={"d_model": 16, "n_layers": 1, "n_heads": 2}, tokenizer=TokenizerConfig(max_seq_len=32),
                         max_steps=2, batch_size=8, eval_every=2, save_every=2, warmup_steps=1)
    return train(cfg)


def test_pretraining_export(pretrained, tmp_path):
    folder = shutil.copytree(pretrained, tmp_path / "model")
    assert_one_reader_checks_the_manifest(folder, CellTransformerForPretraining)
    with pytest.raises(CheckpointError, match=TAMPERED):
        atlasformer.from_pretrained(folder)


def test_fine_tuned_annotation(pretrained, tmp_path, sim_adata):
    task = Annotator(pretrained, FinetuneConfig(max_seq_len=32, epochs=1),
                     labels_key="cell_type")
    task.fit(sim_adata[:120].copy())
    folder = task.save(tmp_path / "annotation")
    model, tokenizer = load_model_folder(folder)
    assert len(tokenizer.vocab) == model.config.vocab_size and "metrics.json" in read_manifest(folder)["files"]
    assert_one_reader_checks_the_manifest(folder, CellTransformerForAnnotation)
    with pytest.raises(CheckpointError, match=TAMPERED):
        Annotator.load(folder)


def test_scvi_wrapper(tmp_path, sim_adata):
    model = SCVIModel(batch_key="batch", epochs=1, gene_likelihood="nb", n_latent=4)
    model.fit(sim_adata[:200].copy())
    folder = model.save(tmp_path / "scvi")
    assert push_model_folder(folder, "atlas-org/scvi", dry_run=True)["files"]  # a complete folder, hub-ready
    module, config = load_vae_folder(folder, architectures=("SCVIModule",))
    assert config["wrapper"] == "SCVIModel" and config["batches"] == model.batches
    assert "SCVIModel.load(MODEL)" in (folder / "README.md").read_text()

    old = shutil.copytree(folder, tmp_path / "scvi-before-cards")  # folders saved before the card still load
    (old / "README.md").unlink()
    write_manifest(old, json.loads((old / "atlasformer.json").read_text())["run_config"])
    assert SCVIModel.load(old).genes == model.genes

    assert_one_reader_checks_the_manifest(folder, SCVIModule)
    with pytest.raises(CheckpointError, match=TAMPERED):
        SCVIModel.load(folder)


def test_geneformer_converter(tmp_path):
    make_geneformer_repo(tmp_path / "repo", GENES)
    folder = convert_geneformer(tmp_path / "repo", tmp_path / "converted", subfolder="gf-2L-test")
    assert_one_reader_checks_the_manifest(folder, CellTransformerForPretraining)


def test_scgpt_converter(scgpt_model_class, tmp_path):  # noqa: F811
    save_scgpt_checkpoint(scgpt_model_class, tmp_path / "scgpt", SYMBOLS)
    folder = convert_scgpt(tmp_path / "scgpt", tmp_path / "converted")
    assert_one_reader_checks_the_manifest(folder, CellTransformerForPretraining)


def test_one_strict_weight_check():
    layer = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match=r"^here: .*missing \['bias'\], unexpected \['extra'\]"):
        load_state_dict_strict(layer, {"weight": torch.zeros(2, 3), "extra": torch.zeros(1)}, source="here")
    with pytest.raises(CheckpointError, match=r"^here: .*size mismatch for weight"):
        load_state_dict_strict(layer, {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, source="here")
    assert not load_state_dict_strict(layer, {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}, source="here").training
