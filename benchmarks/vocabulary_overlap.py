"""How much of each public file a model's vocabulary covers, by genes and by counts (docs/pretraining.md).

The overlap check weighs genes by their counts; this prints both figures, so a vocabulary cut to the genes that
are ever tokens (``vocab_min_token_cells``) can be compared with the shipped one.

    python benchmarks/vocabulary_overlap.py MODEL [MODEL ...] [--data DATA_DIR]   # default ../shared/data
"""

import argparse
import logging

import anndata as ad

from atlasformer.checkpoints import load_model_folder, resolve_model
from atlasformer.tokenization.data import gene_counts, gene_keys

FILES = ("cellbench_lung_lines_5batches", "kang_pbmc_8donors", "baron_mouse_pancreas", "pbmc4k_10x_v2",
         "scicar_mouse_kidney.rna", "pbmc1k_cite.rna")


def coverage(adata: ad.AnnData, tokenizer, source: str) -> tuple[float, float]:
    """(fraction of expressed genes, fraction of counts) on the tokenizer's vocabulary genes."""
    cfg = tokenizer.config
    known = tokenizer.column_ids(gene_keys(adata, source=source, gene_id_mode=cfg.gene_id_mode,
                                           gene_table=cfg.gene_table)) >= 0
    totals = gene_counts(adata)
    expressed = totals > 0
    return float(known[expressed].mean()), float(totals[known].sum() / totals.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", default="../shared/data")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the resolution reports of every file
    for model in args.models:
        _, tokenizer = load_model_folder(resolve_model(model))
        for name in FILES:
            genes, counts = coverage(ad.read_h5ad(f"{args.data}/{name}.h5ad"), tokenizer, name)
            print(f"{model} {name}: expressed genes {genes:.1%}, counts {counts:.1%}", flush=True)


if __name__ == "__main__":
    main()
