"""How much batch and how much cell type the frozen embeddings carry (docs/model_quality.md, integration).

For one file, embeds every cell three ways: the PCs of log-normalised HVGs (what Harmony corrects), the frozen
embedding of a pretrained model, and that of a randomly initialised model of the same shape over the file's own
genes (the benchmark's ``atlasformer_scratch`` before any head). For each, 5-fold cross-validated logistic
regression (C=1, on z-scored dimensions) predicts the batch and the cell type: an embedding that predicts the
batch well keeps the technology, which Harmony must then remove.

    python benchmarks/embedding_batch_signal.py                     # the three files of docs/model_quality.md
    python benchmarks/embedding_batch_signal.py DATA LABELS_KEY BATCH_KEY [DATA LABELS_KEY BATCH_KEY ...]

Prints one row per embedding and writes every file's figures, with the date and machine, to
benchmarks/results/embedding_batch_signal.json (``--output``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from atlasformer.finetune.common import frozen_embeddings, load_backbone, read_counts, tokenize_for_model
from atlasformer.finetune.config import FinetuneConfig
from atlasformer.finetune.integration import highly_variable, log_normalised_pcs
from atlasformer.model_zoo import CellTransformer
from atlasformer.tokenization.corpus_format import write_json_atomic

DEFAULT_FILES = ("../shared/data/cellbench_lung_lines_5batches.h5ad cell_line batch "
                 "../shared/data/kang_pbmc_8donors.h5ad cell_type batch "
                 "../shared/data/baron_mouse_pancreas.h5ad cell_type batch").split()


def backbone_embedding(adata: ad.AnnData, model: str | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(cells kept, d_model) frozen embedding and the obs rows they are: pretrained ``model``, or random (None)."""
    cfg = FinetuneConfig(from_scratch=model is None, seed=seed)
    backbone, tokenizer, config = load_backbone(model, cfg, [adata])
    if backbone is None:  # the shape the benchmark's scratch model gets, drawn from the seed
        torch.manual_seed(seed)
        backbone = CellTransformer(config)
    backbone.eval()
    data = tokenize_for_model(adata, tokenizer, source="data")
    return frozen_embeddings(backbone, data.cells, tokenizer), data.cells.cell_index


def predictability(x: np.ndarray, target: np.ndarray, seed: int = 0) -> float:
    """Mean 5-fold cross-validated accuracy of logistic regression predicting ``target`` from ``x``."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000, random_state=seed))
    return float(cross_val_score(model, x, target, cv=5).mean())


def signal(path: str, labels_key: str, batch_key: str, model: str) -> dict:
    """Batch and cell-type accuracy of the PCs, the pretrained and the random embedding of one file."""
    adata = ad.read_h5ad(path)
    counts = read_counts(adata, None, path)
    embeddings = {"pcs": (log_normalised_pcs(counts, highly_variable(counts)), np.arange(adata.n_obs)),
                  "pretrained": backbone_embedding(adata, model), "scratch": backbone_embedding(adata, None)}
    rows = {}
    for name, (x, cells) in embeddings.items():
        obs = adata.obs.iloc[cells]
        rows[name] = {"batch_accuracy": round(predictability(x, obs[batch_key].astype(str).to_numpy()), 4),
                      "label_accuracy": round(predictability(x, obs[labels_key].astype(str).to_numpy()), 4),
                      "dims": int(x.shape[1])}
        print(f"{path} {name}: batch accuracy {rows[name]['batch_accuracy']:.4f}, "
              f"cell-type accuracy {rows[name]['label_accuracy']:.4f} ({x.shape[1]} dims)", flush=True)
    chance = adata.obs[batch_key].astype(str).value_counts(normalize=True).max()
    return {"data": path, "model": model, "majority_batch_fraction": round(float(chance), 4), "embeddings": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", default=DEFAULT_FILES, help="DATA LABELS_KEY BATCH_KEY, repeated")
    parser.add_argument("--model", default="atlasformer-public-small")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/embedding_batch_signal.json"))
    args = parser.parse_args()
    if len(args.files) % 3:
        parser.error("give each file as DATA LABELS_KEY BATCH_KEY")
    torch.set_num_threads(1)
    results = [signal(*args.files[i : i + 3], args.model) for i in range(0, len(args.files), 3)]
    write_json_atomic(args.output, {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()}, {platform.machine()}, {os.cpu_count()} cores, 1 torch thread",
        "command": "python benchmarks/embedding_batch_signal.py " + " ".join(args.files), "results": results})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
