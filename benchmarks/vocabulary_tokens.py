"""How many genes of the shipped model's vocabulary are ever a token on its corpus (docs/pretraining.md).

A cell's tokens are its ``max_seq_len`` most expressed genes, so a gene counted in many cells can still never
enter the model, and its embedding row never trains. This counts, per vocabulary gene, the corpus cells in which
it is a token, with the vocabulary and tokenizer the shipped recipe builds (configs/pretrain/public_small.yaml).

    python benchmarks/vocabulary_tokens.py [DATA_DIR]    # default ../shared/data
"""

import sys

import numpy as np

from atlasformer.config import load_config
from atlasformer.pretrain import PretrainConfig
from atlasformer.pretrain.train import make_tokenizer
from atlasformer.tokenization import open_inputs
from atlasformer.tokenization.data import cells_with_token

CORPUS = ("kang_pbmc_8donors cellbench_lung_lines_5batches pbmc_10x_3chemistries pbmc4k_10x_v2 pbmc_sorted_reference "
          "pbmc_donorA_query kang_pbmc_ctrl_stim pbmc_celltypist_sample pbmc1k_cite.rna eccite_pbmc_500.rna").split()
"""The shipped model's corpus, as scripts/build_public_model.sh lists it."""


def main() -> None:
    data = sys.argv[1] if len(sys.argv) > 1 else "../shared/data"
    paths = [f"{data}/{name}.h5ad" for name in CORPUS]
    cfg = load_config(PretrainConfig, "configs/pretrain/public_small.yaml", [f"data={paths[0]}", "output=unused"])
    inputs = open_inputs(paths)
    tokenizer = make_tokenizer(cfg, inputs)
    cells_as_token = cells_with_token([a for _, a in inputs], tokenizer, sources=[s for s, _ in inputs])  # (vocabulary,)
    genes = np.array([tokenizer.vocab.token_to_id[g] for g in tokenizer.vocab.genes])
    print(f"vocabulary genes: {len(genes):,} (vocab_min_cells={cfg.vocab_min_cells}, "
          f"{cfg.tokenizer.max_seq_len} genes per cell)")
    for n in (1, 5, 20):
        print(f"a token in >= {n} cells: {int((cells_as_token[genes] >= n).sum()):,}")


if __name__ == "__main__":
    main()
