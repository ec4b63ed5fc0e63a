"""Tutorial: predicting protein (CITE-seq) from RNA, then for RNA-only cells.

Runs in well under a minute on simulated data:

    python docs/tutorials/modality.py [OUTPUT_DIR]

The same on files, from the command line (ATAC: --modality atac --paired cells.atac.h5ad):

    atlasformer finetune modality --modality protein --data cells.rna.h5ad --paired cells.protein.h5ad \\
        --model MODEL --output prot/
    atlasformer predict modality --model prot/model --data rna_only.h5ad --output prot/rna_only/
"""

import sys
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from atlasformer.finetune import FinetuneConfig, ModalityPredictor, finetune_file, predict_modality
from atlasformer.finetune.metrics import clr, protein_metrics
from atlasformer.tokenization import simulate_counts

output = Path(sys.argv[1] if len(sys.argv) > 1 else "tutorial_output") / "modality"
inputs = output.with_name(f"{output.name}_inputs")  # beside the outputs: an output folder may not hold an input
inputs.mkdir(parents=True, exist_ok=True)

# Simulated CITE-seq: protein counts depend on the cell type; the last 150 cells have RNA only.
rna = simulate_counts(n_cells=550, n_genes=300, n_cell_types=4, n_batches=1, seed=0)
types = rna.obs["cell_type"].cat.codes.to_numpy()
levels = np.random.default_rng(1).gamma(2.0, 10.0, size=(4, 6))  # (cell types, proteins)
protein = ad.AnnData(sp.csr_matrix(np.random.default_rng(2).poisson(levels[types]).astype(np.float32)),
                     obs=rna.obs[[]].copy())
protein.var_names = ["CD3", "CD4", "CD8", "CD14", "CD19", "CD56"]
paired, rna_only = rna[:400].copy(), rna[400:].copy()
paired.write_h5ad(inputs / "cells.rna.h5ad")
protein[:400].copy().write_h5ad(inputs / "cells.protein.h5ad")

config = FinetuneConfig(from_scratch=True, scratch_model={"d_model": 32, "n_layers": 2, "n_heads": 2},
                        max_seq_len=128, epochs=5, lr=2e-3, head_lr=3e-3, val_fraction=0.2)
task = ModalityPredictor(None, config, modality="protein", paired=inputs / "cells.protein.h5ad")
summary = finetune_file(task, inputs / "cells.rna.h5ad", output)
val = summary["validation"]
print(f"validation RMSE (CLR) {val['rmse']:.3f} vs mean predictor {val['mean_baseline']['rmse']:.3f}")

# RNA-only cells: predictions in obsm['protein_predicted'], names in uns['protein_predicted_names'].
predict_modality(rna_only, output / "model")
truth = clr(protein[400:].X)
print("RNA-only cells:", protein_metrics(truth, rna_only.obsm["protein_predicted"]),
      list(rna_only.uns["protein_predicted_names"]))
