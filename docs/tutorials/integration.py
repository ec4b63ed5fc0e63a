"""Tutorial: batch integration without labels, scored with scib-metrics and shown as UMAPs.

Runs in about a minute on simulated data (most of it scib-metrics' and UMAP's one-off compilation):

    python docs/tutorials/integration.py [OUTPUT_DIR]

The same on a file, from the command line (--labels-key only scores and colours the result):

    atlasformer finetune integration --data atlas.h5ad --batch-key batch --labels-key cell_type \\
        --model MODEL --output integ/
    atlasformer predict integration --model integ/model --data new_batches.h5ad --output integ/new/
"""

import json
import sys
from pathlib import Path

from atlasformer.finetune import FinetuneConfig, Integrator, finetune_file, integrate
from atlasformer.tokenization import simulate_counts

output = Path(sys.argv[1] if len(sys.argv) > 1 else "tutorial_output") / "integration"
inputs = output.with_name(f"{output.name}_inputs")  # beside the outputs: an output folder may not hold an input
inputs.mkdir(parents=True, exist_ok=True)
simulate_counts(n_cells=600, n_genes=300, n_cell_types=4, n_batches=3, batch_sd=0.8, seed=0).write_h5ad(inputs / "cells.h5ad")

config = FinetuneConfig(from_scratch=True, scratch_model={"d_model": 32, "n_layers": 2, "n_heads": 2, "pooling": "mean"},
                        max_seq_len=128, epochs=3, lr=2e-3, head_lr=3e-3)
# kBET and BRAS are switched off here only to keep the tutorial fast (the metrics report says so)
integrator = Integrator(None, config, batch_key="batch", labels_key="cell_type",
                        scib_disable=("kbet_per_label", "bras"))
summary = finetune_file(integrator, inputs / "cells.h5ad", output)  # cells.h5ad with obsm, umap_*.png
for method, scores in summary["validation"]["scib"].items():
    print(method, json.dumps({k: round(scores[k], 3) for k in ("bio_conservation", "batch_correction", "total")}))

# The fine-tuned model embeds new cells without needing their batch.
import anndata as ad  # noqa: E402

new = ad.read_h5ad(inputs / "cells.h5ad")[:100].copy()
integrate(new, output / "model")
print("integrated embedding:", new.obsm["X_atlasformer_integrated"].shape, "plots:", summary["plots"])
