"""atlasformer-public-small ships with the package: it loads offline by name (Python and CLI), its folder passes
the manifest check, stays under 10 MiB, states its corpus, steps and held-out loss, and is inside the wheel."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
import yaml

import atlasformer
from atlasformer.checkpoints import SHIPPED_MODELS, shipped_model_folder

NAME = "atlasformer-public-small"
ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_model_loads_offline_by_name(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = atlasformer.from_pretrained(NAME)  # verifies every file against the manifest
    assert NAME in SHIPPED_MODELS and len(tokenizer.vocab) == model.config.vocab_size
    folder = shipped_model_folder(NAME)
    assert (folder / "model.safetensors").stat().st_size < 10 * 2**20
    card = (folder / "README.md").read_text()
    steps = yaml.safe_load((ROOT / "configs/pretrain/public_small.yaml").read_text())["max_steps"]  # its recipe
    assert "kang_pbmc_8donors.h5ad" in card and f"- steps: {steps}" in card and f"held-out loss at step {steps}" in card
    assert "/work/" not in card and "../" not in card  # no local path of the machine that built it
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def cells_with_vocabulary_genes(n_cells=40, n_genes=300, seed=0):
    _, tokenizer = atlasformer.from_pretrained(NAME)
    genes = [g for g in tokenizer.vocab.genes if not g.startswith("<")][:n_genes]
    rng = np.random.default_rng(seed)
    x = sp.csr_matrix(rng.poisson(1.0, size=(n_cells, n_genes)).astype(np.float32))
    adata = ad.AnnData(x)
    adata.var_names = genes
    return adata


def test_embed_with_the_shipped_model_from_the_cli(tmp_path):
    adata = cells_with_vocabulary_genes()
    adata.write_h5ad(tmp_path / "cells.h5ad")
    proc = subprocess.run([sys.executable, "-m", "atlasformer.cli", "embed", "--model", NAME, "--data",
                           str(tmp_path / "cells.h5ad"), "--output", str(tmp_path / "emb")], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = ad.read_h5ad(tmp_path / "emb" / "cells.h5ad")
    assert out.obsm["X_atlasformer"].shape == (40, 64) and np.isfinite(out.obsm["X_atlasformer"]).all()


def test_the_cli_names_the_shipped_model_the_hub_module_ships():
    from atlasformer.cli import SHIPPED_MODEL

    assert SHIPPED_MODEL in SHIPPED_MODELS


def test_a_missing_shipped_folder_names_the_fix(monkeypatch, tmp_path):
    import atlasformer.checkpoints.hub as hub

    monkeypatch.setattr(hub, "__file__", str(tmp_path / "hub.py"))
    with pytest.raises(hub.CheckpointError, match="reinstall"):
        hub.shipped_model_folder(NAME)


def test_the_wheel_carries_the_shipped_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("atlasformer-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for file in ("model.safetensors", "config.json", "vocab.json", "tokenizer_config.json", "atlasformer.json"):
        assert f"atlasformer/checkpoints/pretrained/{NAME}/{file}" in names
    manifest = json.loads(zipfile.ZipFile(wheel).read(f"atlasformer/checkpoints/pretrained/{NAME}/atlasformer.json"))
    assert "model.safetensors" in manifest["files"]


def test_ship_and_compare_scripts_round_trip(tmp_path, sim_adata):
    """scripts/ship_model.py writes a loadable folder whose card states corpus, steps and held-out loss, with no
    local path; scripts/compare_weights.py finds it identical to the run's model and names a changed tensor."""
    from safetensors.numpy import load_file, save_file

    from atlasformer.checkpoints import export_model_folder
    from atlasformer.model_zoo import CellTransformerConfig, CellTransformerForPretraining
    from atlasformer.tokenization import CellTokenizer, TokenizerConfig, build_vocab

    vocab = build_vocab([sim_adata], gene_id_mode="raw")
    tokenizer = CellTokenizer(vocab, TokenizerConfig(max_seq_len=32, gene_id_mode="raw"))
    config = CellTransformerConfig(vocab_size=len(vocab), d_model=16, n_layers=1, n_heads=2, pad_token_id=vocab.pad_id,
                                   cls_token_id=vocab.cls_id, mask_token_id=vocab.mask_id)
    run = tmp_path / "run"
    export_model_folder(CellTransformerForPretraining(config), tokenizer, run / "model",
                        {"data": ["/somewhere/local/cells.h5ad"], "output": str(run), "max_steps": 20})
    (run / "metrics.jsonl").write_text('{"step": 0, "eval/loss": 9.5}\n{"step": 20, "eval/loss": 4.25}\n')
    script = ROOT / "scripts"
    subprocess.run([sys.executable, str(script / "ship_model.py"), str(run), str(tmp_path / "shipped"), "12", "1"],
                   check=True, capture_output=True)
    model, _ = atlasformer.from_pretrained(tmp_path / "shipped")
    card = (tmp_path / "shipped" / "README.md").read_text()
    assert "cells.h5ad" in card and "/somewhere" not in card and "held-out loss at step 20 | 4.2500" in card
    same = subprocess.run([sys.executable, str(script / "compare_weights.py"), str(run / "model"),
                           str(tmp_path / "shipped")], capture_output=True, text=True, check=True)
    assert json.loads(same.stdout.splitlines()[-1])["identical"] is True
    weights = load_file(str(tmp_path / "shipped" / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(tmp_path / "shipped" / "model.safetensors"))
    differ = subprocess.run([sys.executable, str(script / "compare_weights.py"), str(run / "model"),
                             str(tmp_path / "shipped")], capture_output=True, text=True, check=True)
    assert name in differ.stdout and json.loads(differ.stdout.splitlines()[-1])["identical"] is False

    # float16 storage (a wider model under the 10 MiB budget): loads as float32, compares after the same rounding
    subprocess.run([sys.executable, str(script / "ship_model.py"), str(run), str(tmp_path / "half"), "12", "1", "float16"],
                   check=True, capture_output=True)
    assert {t.dtype for t in load_file(str(tmp_path / "half" / "model.safetensors")).values()} == {np.dtype("float16")}
    half, _ = atlasformer.from_pretrained(tmp_path / "half")
    assert {p.dtype for p in half.parameters()} == {torch.float32}
    assert "| stored weights | float16 (loaded as float32) |" in (tmp_path / "half" / "README.md").read_text()
    rounded = subprocess.run([sys.executable, str(script / "compare_weights.py"), str(run / "model"),
                              str(tmp_path / "half")], capture_output=True, text=True, check=True)
    assert json.loads(rounded.stdout.splitlines()[-1])["identical"] is True


def test_quickstart_on_a_users_file_starts_from_the_shipped_model(tmp_path):
    adata = cells_with_vocabulary_genes(n_cells=120, seed=1)
    kind = np.arange(120) % 2
    x = adata.X.toarray()
    x[kind == 1, :20] += 6  # a planted marker block
    adata.X = sp.csr_matrix(x)
    adata.obs["cell_type"] = np.where(kind == 1, "b", "a")
    adata.write_h5ad(tmp_path / "mine.h5ad")
    proc = subprocess.run([sys.executable, "-m", "atlasformer.cli", "quickstart", "--data", str(tmp_path / "mine.h5ad"),
                           "--labels-key", "cell_type", "--output", str(tmp_path / "qs")], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    # "fine-tuning <model>" is a progress message: the atlasformer logger writes it to stderr
    assert f"fine-tuning {NAME}" in proc.stderr and not (tmp_path / "qs" / "pretrain").exists()
    summary = json.loads((tmp_path / "qs" / "annotation" / "metrics.json").read_text())
    assert summary["validation"]["accuracy"] > 0.9
