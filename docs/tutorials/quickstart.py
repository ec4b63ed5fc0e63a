"""Tutorial: pretrain a small model and fine-tune cell-type annotation, from Python.

Run: python docs/tutorials/quickstart.py [output_dir]
The annotation part of `atlasformer quickstart`, written out step by step (the other heads have their own
tutorials in this folder). Takes about a minute on 2 CPU cores.
"""

import sys
from pathlib import Path

import anndata as ad

from atlasformer.finetune import Annotator, FinetuneConfig, annotate
from atlasformer.pretrain import PretrainConfig, train
from atlasformer.tokenization import TokenizerConfig, simulate_counts

out = Path(sys.argv[1] if len(sys.argv) > 1 else "tutorial_quickstart")
out.mkdir(parents=True, exist_ok=True)

# 1. Data: raw counts with cell types and batches (bring your own h5ad instead).
adata = simulate_counts(n_cells=800, n_genes=400, seed=0)
adata.write_h5ad(out / "cells.h5ad")

# 2. Pretrain a small transformer with the masked-value objective.
cfg = PretrainConfig(
    data=(str(out / "cells.h5ad"),),
    output=str(out / "pretrain"),
    model={"d_model": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.0},
    tokenizer=TokenizerConfig(max_seq_len=128),
    max_steps=60, batch_size=32, lr=2e-3, warmup_steps=10, eval_every=30, save_every=30,
)
model_dir = train(cfg)

# 3. Fine-tune a cell-type classifier on the pretrained backbone, validating on one batch.
annotator = Annotator(model_dir, FinetuneConfig(epochs=3, lr=1e-3, head_lr=3e-3, val_batch="batch_1"),
                      labels_key="cell_type", batch_key="batch")
metrics = annotator.fit(adata)
print(f"validation accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
annotator.save(out / "annotation_model")

# 4. Annotate: obs['atlasformer_label'] and obs['atlasformer_confidence'].
query = ad.read_h5ad(out / "cells.h5ad")
annotate(query, out / "annotation_model")
print(query.obs[["cell_type", "atlasformer_label", "atlasformer_confidence"]].head())
