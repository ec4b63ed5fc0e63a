"""Where data enters: AnnData reading and checks, gene vocabularies, tokenizers, batching, simulation."""

from .anndata_io import InputError, check_counts, expand_data_paths, iter_count_chunks, read_h5ad
from .batching import BatchOrder, collate
from .data import (
    TokenizedData,
    build_vocab,
    column_token_ids,
    gene_keys,
    input_stem,
    iter_tokenized,
    open_inputs,
    tokenize_anndata,
)
from .simulate import simulate_counts
from .tokenizer import CellTokenizer, TokenizedCells, TokenizerConfig, TokenizeReport
from .vocab import GeneVocab

__all__ = [
    "BatchOrder",
    "CellTokenizer",
    "GeneVocab",
    "InputError",
    "TokenizeReport",
    "TokenizedCells",
    "TokenizedData",
    "TokenizerConfig",
    "build_vocab",
    "check_counts",
    "collate",
    "column_token_ids",
    "expand_data_paths",
    "gene_keys",
    "input_stem",
    "iter_count_chunks",
    "iter_tokenized",
    "open_inputs",
    "read_h5ad",
    "simulate_counts",
    "tokenize_anndata",
]
