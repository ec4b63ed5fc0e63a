"""Tutorial: what a model knows about genes: gene embeddings, gene programs, known gene sets, attention networks and
in-silico perturbation.

Runs in well under a minute on simulated data, on one thread:

    python docs/tutorials/genes.py [OUTPUT_DIR]

The same on files, from the command line (--model defaults to the shipped atlasformer-public-small; --corpus names
the files it was pretrained on, which tells exactly which genes it saw):

    atlasformer genes embed --model MODEL --data cells.h5ad --corpus pretraining.h5ad --output genes/
    atlasformer genes programs --model MODEL --data cells.h5ad --corpus pretraining.h5ad --gene-sets sets.gmt \\
        --output programs/
    atlasformer genes network --model MODEL --data cells.h5ad --groupby cell_type --output network/
    atlasformer genes perturb --model MODEL --data cells.h5ad --genes GENE1 GENE2+GENE3 --cells cell_type=type_1 \\
        --target cell_type=type_1 --output perturb/

docs/genes.md explains each step and what the shipped model showed on real data.
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from atlasformer.analysis import (
    GENE_EMBEDDINGS_FILE,
    attention_network,
    gene_embeddings,
    gene_programs,
    gene_set_enrichment,
    perturb_genes,
    rank_genes_by_effect,
    score_programs,
)
from atlasformer.finetune.baselines import log_normalize
from atlasformer.pretrain import PretrainConfig, train
from atlasformer.tokenization import TokenizerConfig, simulate_counts

output = Path(sys.argv[1] if len(sys.argv) > 1 else "tutorial_output") / "genes"
inputs = output.with_name(f"{output.name}_inputs")  # beside the outputs: an output folder may not hold an input
inputs.mkdir(parents=True, exist_ok=True)
pd.set_option("display.width", 160)
pd.set_option("display.max_columns", 12)

# 1. Cells of 4 types; each type has 25 marker genes that go up together, the gene modules to look for.
cells = simulate_counts(n_cells=600, n_genes=300, n_cell_types=4, n_batches=2, seed=0)
cells.write_h5ad(inputs / "cells.h5ad")

# 2. A model. Simulated genes are in no pretrained vocabulary, so a tiny model is pretrained on these cells here
#    (about 10 s); each cell's 64 most expressed genes are its tokens, so the least expressed genes are never seen.
#    On real data pass "atlasformer-public-small" (shipped), a model folder or a hub id.
run = output / "pretrain"
config = PretrainConfig(data=(str(inputs / "cells.h5ad"),), output=str(run),
                        model={"d_model": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.0},
                        tokenizer=TokenizerConfig(max_seq_len=64, n_bins=21, gene_id_mode="raw"), max_steps=300,
                        batch_size=32, lr=3e-3, warmup_steps=10, eval_every=300, save_every=300, seed=0, cpu=True)
model = run / "model" if (run / "model" / "atlasformer.json").exists() else train(config)

# 3. Gene embeddings: the input embedding of every vocabulary gene (X), the context-aware one over these cells
#    (layers['context']), and which genes pretraining saw, from its corpus (obs['seen_in_pretraining']).
genes = gene_embeddings(model, data=cells, corpus=[inputs / "cells.h5ad"], cpu=True)
print(f"{genes.n_obs} vocabulary genes x {genes.n_vars} dimensions; {int(genes.obs['seen_in_pretraining'].sum())} "
      f"seen in pretraining (from the {genes.uns['gene_embeddings']['seen_from']})")

# 4. Gene programs: Leiden clusters of the seen genes' embeddings, scored in every cell.
programs = gene_programs(genes)
print(f"{len(programs)} programs of sizes {programs['n_genes'].tolist()}")
score_programs(cells, programs)  # obs['program_0'], ...
scores = cells.obs.groupby("cell_type", observed=True)[[f"program_{p}" for p in programs.index]].mean()
print("mean program score per cell type:\n", scores.round(2))


# 5. Known gene sets: is a set more cohesive in the embedding than random sets of genes seen as often? Here the
#    "known" sets are each type's 20 most up-regulated genes, and a random control set. On a model this small,
#    trained for seconds, a set need not pass the test; docs/genes.md has what the shipped model gives on real sets.
def top_markers(cell_type: str, n: int = 20) -> list[str]:
    x = log_normalize(cells.X).toarray()  # (cells, genes)
    inside = (cells.obs["cell_type"] == cell_type).to_numpy()
    return list(cells.var_names[np.argsort(x[~inside].mean(0) - x[inside].mean(0))[:n]])


sets = {f"{t} markers": top_markers(t) for t in sorted(cells.obs["cell_type"].unique())}
sets["random control"] = list(np.random.default_rng(0).choice(cells.var_names, 20, replace=False))
columns = ["n_present", "cohesion", "null_mean", "effect", "p_value", "program", "program_fraction"]
enrichment = gene_set_enrichment(genes, sets)  # the input embedding
print("input embedding:\n", enrichment[columns].round(3))
context = gene_set_enrichment(genes, sets, use_rep="context")
print("context-aware embedding:\n", context[columns].round(3))

# 6. Attention networks: the strongest gene -> gene attention of the last layer, averaged per cell type.
edges = attention_network(cells, model, groupby="cell_type", top_edges=20, max_cells_per_group=60, cpu=True)
print(edges.groupby("group").head(2))

# 7. In-silico perturbation: delete each type's markers from cells of that type (the effect: how much closer each
#    cell gets to its type's centroid; negative is away), beside random sets of the same size as controls.
rng = np.random.default_rng(1)
perturbations = {"type_1 markers": top_markers("type_1", 10),
                 **{f"random {i}": list(rng.choice(cells.var_names, 10, replace=False)) for i in range(4)}}
per_cell = perturb_genes(cells, model, perturbations, mode="delete", cells="cell_type=type_1",
                         target="cell_type=type_1", cpu=True)
ranked = rank_genes_by_effect(per_cell)
print(ranked[["perturbation", "n_cells", "cosine_shift", "target_shift", "fraction_toward", "direction"]])

# The files the command line writes.
genes.write_h5ad(output / GENE_EMBEDDINGS_FILE)
table = programs.reset_index()
table[["gene_ids", "symbols"]] = table[["gene_ids", "symbols"]].map(",".join)
table.to_csv(output / "programs.csv", index=False)
enrichment.reset_index().to_csv(output / "enrichment.csv", index=False)
edges.to_csv(output / "attention_edges.csv", index=False)
per_cell.to_csv(output / "perturbation_per_cell.csv", index=False)
ranked.to_csv(output / "perturbation_ranked.csv", index=False)
