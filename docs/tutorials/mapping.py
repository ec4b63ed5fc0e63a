"""Tutorial: map a query onto a labelled reference, search the reference's cells, and map with scArches surgery.

Runs in well under a minute on simulated data, on one thread:

    python docs/tutorials/mapping.py [OUTPUT_DIR]

The same on files, from the command line (MODEL: a model folder, a hub id, or the default atlasformer-public-small):

    atlasformer map --reference reference.h5ad --query query.h5ad --labels-key cell_type --batch-key batch \\
        --model MODEL --output mapped/
    atlasformer index build --data reference.h5ad --model MODEL --obs-keys cell_type --output reference_index/
    atlasformer index search --index reference_index/ --data query.h5ad --k 10 --output hits/

docs/mapping.md explains each step (the representation, the calibration, the unknown call, the index format).
"""

import json
import sys
from pathlib import Path

import numpy as np

import atlasformer
from atlasformer.finetune import (
    CellIndex,
    SCANVIModel,
    SCVIModel,
    build_index,
    map_query,
    plot_mapping,
    search_index,
    transfer_labels,
)
from atlasformer.pretrain import PretrainConfig, train
from atlasformer.tokenization import TokenizerConfig, simulate_counts

output = Path(sys.argv[1] if len(sys.argv) > 1 else "tutorial_output") / "mapping"
inputs = output.with_name(f"{output.name}_inputs")  # beside the outputs: an output folder may not hold an input
inputs.mkdir(parents=True, exist_ok=True)

# 1. A reference (batches 0 and 1, labelled) and a query (batch 2). type_4 is left out of the reference: the
#    query holds a cell type the reference has never seen.
cells = simulate_counts(n_cells=900, n_genes=300, n_cell_types=5, n_batches=3, seed=0)
reference = cells[(cells.obs["batch"] != "batch_2") & (cells.obs["cell_type"] != "type_4")].copy()
query = cells[cells.obs["batch"] == "batch_2"].copy()
reference.write_h5ad(inputs / "reference.h5ad")

# 2. A model. Simulated genes are in no pretrained vocabulary, so a tiny model is pretrained on the reference here
#    (about 10 s); on real data pass "atlasformer-public-small" (shipped), a model folder or a hub id instead.
run = output / "pretrain"
config = PretrainConfig(data=(str(inputs / "reference.h5ad"),), output=str(run),
                        model={"d_model": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.0},
                        tokenizer=TokenizerConfig(max_seq_len=64, n_bins=21, gene_id_mode="raw"), max_steps=300,
                        batch_size=32, lr=3e-3, warmup_steps=10, eval_every=300, save_every=300, seed=0, cpu=True)
model = run / "model" if (run / "model" / "atlasformer.json").exists() else train(config)

truth = query.obs["cell_type"].astype(str)
known = (truth != "type_4").to_numpy()  # query cells of a type the reference has

# 3. Cell search: index the reference's embeddings with the obs columns to report, then look up each query cell's
#    most similar reference cells (cosine). The index is a folder: index.faiss, obs.parquet, index.json.
atlasformer.embed(reference, model, cpu=True)  # obsm['X_atlasformer'], with its provenance
atlasformer.embed(query, model, cpu=True)
build_index(reference, obs_keys=["cell_type"]).save(output / "index", overwrite=True)
hits = search_index(CellIndex.load(output / "index"), query, k=10)  # one row per query cell and rank
hits.to_csv(output / "query_neighbours.csv", index=False)
commonest = hits.groupby("query_cell", sort=False)["cell_type"].agg(lambda s: s.astype(str).mode()[0])
print(f"cell search: the commonest type among the 10 nearest reference cells is the cell's own for "
      f"{(commonest.to_numpy() == truth.to_numpy())[known].mean():.0%} of known-type query cells (the tiny model's "
      "embedding alone)")

# 4. scArches surgery: scVI trained on the reference with the batch seen by the encoder; the query's batch is added
#    as a new category and only its weights are trained on the query. Then the calibrated kNN of step 5 on the latent.
scvi = SCVIModel(batch_key="batch", encode_covariates=True, epochs=20, seed=0)
scvi.fit(reference, source="reference")
surgery = scvi.map_query(query, epochs=20)  # a new model; scvi is unchanged
reference.obsm["X_scvi"], query.obsm["X_scvi"] = surgery.embed(reference), surgery.embed(query)
by_scvi = transfer_labels(query, reference, labels_key="cell_type", use_rep="X_scvi", batch_key="batch", copy=True)
print(f"scVI surgery + kNN: {(by_scvi.obs['atlasformer_label'].astype(str) == truth)[known].mean():.1%} correct")

# scANVI from the scVI weights (scvi-tools' recipe), its own surgery, and its classifier's labels.
scanvi = SCANVIModel.from_scvi_model(scvi, labels_key="cell_type", epochs=10)
scanvi.fit(reference, source="reference")
predicted = scanvi.map_query(query, epochs=20).predict(query)
print(f"scANVI surgery: {(predicted == truth.to_numpy())[known].mean():.1%} correct")

# 5. The whole mapping recipe: expression PCs beside the model's embedding ("joint", the default with a model),
#    calibrated weighted kNN label transfer, and the query placed on the reference's UMAP (computed here).
mapped = map_query(reference, query, model, labels_key="cell_type", batch_key="batch", cpu=True)
plot_mapping(reference, mapped, output / "mapping.png", labels_key="cell_type")
mapped.write_h5ad(output / "query.h5ad")
summary = mapped.uns["atlasformer_mapping"]
print("calibration, out of fold on the reference:",
      {k: round(summary[k], 3) for k in ("reference_accuracy", "reference_ece_raw", "reference_ece_calibrated")})
label = mapped.obs["atlasformer_label"].astype(str).to_numpy()
print(f"query cells of reference types labelled correctly: {(label == truth.to_numpy())[known].mean():.1%}")
# A cell is called "unknown" when it lies farther from the reference than 99% of reference cells lie from the
# other batches, or when its calibrated confidence is below 0.5. The new type's cells lie farther than the known
# types' cells; whether past that threshold depends on how far apart the reference's own batches already are.
distance = mapped.obs["atlasformer_neighbour_distance"].to_numpy()
print(f"type_4 (not in the reference): {(label[~known] == 'unknown').mean():.0%} called unknown; median neighbour "
      f"distance {np.median(distance[~known]):.2f} vs {np.median(distance[known]):.2f} for known types "
      f"(threshold {summary['distance_threshold']:.2f})")
counts = mapped.obs["atlasformer_label"].value_counts().astype(int).to_dict()  # as `atlasformer map` writes it
(output / "mapping.json").write_text(json.dumps({**summary, "label_counts": counts}, indent=1, default=str))
