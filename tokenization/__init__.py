"""Where data enters: AnnData reading and checks, gene vocabularies, tokenizers, batching, simulation."""

from .anndata_io import InputError, check_counts, expand_data_paths, iter_count_chunks, read_h5ad
from .batching import BatchOrder, collate
from .corpus import CorpusConfig, build_corpus
from .corpus_format import Corpus, export_hf_dataset, is_corpus
from .data import (
    TokenizedData,
    build_vocab,
    column_token_ids,
    gene_keys,
    input_stem,
    iter_tokenized,
    open_inputs,
    resolve_genes,
    tokenize_anndata,
    vocab_of_tokens,
)
from .gene_ids import GeneIdReport, GeneResolution, load_gene_table, resolve_gene_ids
from .medians import gene_nonzero_medians
from .simulate import simulate_counts, simulate_proteins, simulate_trajectory
from .streaming import CorpusLoader, LoaderConfig
from .tokenizer import CellTokenizer, TokenizedCells, TokenizerConfig, TokenizeReport
from .vocab import GeneVocab

__all__ = [
    "BatchOrder",
    "CellTokenizer",
    "Corpus",
    "CorpusConfig",
    "CorpusLoader",
    "GeneIdReport",
    "GeneResolution",
    "GeneVocab",
    "InputError",
    "LoaderConfig",
    "TokenizeReport",
    "TokenizedCells",
    "TokenizedData",
    "TokenizerConfig",
    "build_corpus",
    "build_vocab",
    "check_counts",
    "collate",
    "column_token_ids",
    "expand_data_paths",
    "export_hf_dataset",
    "gene_keys",
    "gene_nonzero_medians",
    "input_stem",
    "is_corpus",
    "iter_count_chunks",
    "iter_tokenized",
    "load_gene_table",
    "open_inputs",
    "read_h5ad",
    "resolve_gene_ids",
    "resolve_genes",
    "simulate_counts",
    "simulate_proteins",
    "simulate_trajectory",
    "tokenize_anndata",
    "vocab_of_tokens",
]
