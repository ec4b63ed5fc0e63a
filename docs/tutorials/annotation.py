"""Tutorial: cell-type annotation and label transfer to a query whose genes differ.

Runs in well under a minute on simulated data:

    python docs/tutorials/annotation.py [OUTPUT_DIR]

The same on files, from the command line:

    atlasformer finetune annotation --data reference.h5ad --labels-key cell_type --model MODEL --output ann/
    atlasformer predict annotation --model ann/model --data query.h5ad --unknown-threshold 0.5 --output ann/query/
"""

import sys
from pathlib import Path

from atlasformer.finetune import Annotator, FinetuneConfig, annotate, finetune_file
from atlasformer.finetune.metrics import classification_metrics
from atlasformer.tokenization import TokenizerConfig, simulate_counts

output = Path(sys.argv[1] if len(sys.argv) > 1 else "tutorial_output") / "annotation"
inputs = output.with_name(f"{output.name}_inputs")  # beside the outputs: an output folder may not hold an input
inputs.mkdir(parents=True, exist_ok=True)

# A reference and a query from different batches, measured on overlapping but different gene panels.
cells = simulate_counts(n_cells=700, n_genes=300, n_cell_types=4, n_batches=2, seed=0)
reference = cells[cells.obs["batch"] == "batch_0", :270].copy()
query = cells[cells.obs["batch"] == "batch_1", 30:].copy()
reference.write_h5ad(inputs / "reference.h5ad")

# From scratch here: simulated genes are in no pretrained vocabulary. On real data pass "atlasformer-public-small"
# (shipped with the package), a model folder or a hub id. Unset fields take the task's recipe (docs/model_quality.md).
config = FinetuneConfig(from_scratch=True, scratch_model={"d_model": 32, "n_layers": 2, "n_heads": 2},
                        tokenizer=TokenizerConfig(selection="top"), max_seq_len=128, epochs=10, lr=3e-3, head_lr=3e-3)
annotator = Annotator(None, config, labels_key="cell_type")
summary = finetune_file(annotator, inputs / "reference.h5ad", output)  # model/, reference.h5ad, metrics.json, PNG
print("validation:", {k: round(v, 3) for k, v in summary["validation"].items() if isinstance(v, float)})

# Label transfer: the query's genes are looked up in the model's vocabulary; missing ones read as zero.
annotate(query, output / "model", unknown_threshold=0.5)
known = (query.obs["atlasformer_label"] != "unknown").to_numpy()
print(f"query: {known.mean():.0%} of cells labelled with confidence >= 0.5")
if known.any():
    transfer = classification_metrics(query.obs["cell_type"][known], query.obs["atlasformer_label"][known])
    print(f"accuracy on those (the simulation knows the truth): {transfer['accuracy']:.3f}")
print(query.obs[["cell_type", "atlasformer_label", "atlasformer_confidence"]].head())
