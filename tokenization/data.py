"""Tokenizing AnnData objects and h5ad files in chunks, and building vocabularies from them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .anndata_io import (
    InputError,
    check_counts,
    count_matrix,
    expand_data_paths,
    iter_count_chunks,
    read_h5ad,
    require_cells_and_genes,
    to_csr,
)
from .gene_ids import GeneResolution, raw_gene_ids, require_identifiers, resolve_gene_ids
from .tokenizer import CellTokenizer, TokenizedCells, TokenizeReport
from .vocab import GeneVocab


def resolve_genes(
    adata: ad.AnnData,
    gene_key: str | None = None,
    *,
    source: str = "data",
    gene_id_mode: Literal["resolve", "raw"] = "resolve",
    gene_table: str | os.PathLike | None = None,
) -> GeneResolution:
    """Vocabulary key of each of ``adata``'s genes, with the report of how they were found.

    ``gene_id_mode="resolve"`` maps var names and the usual identifier columns to canonical keys
    (:mod:`.gene_ids`); ``"raw"`` takes ``var_names`` (or the ``gene_key`` column) as they are.
    """
    require_cells_and_genes(adata, source=source, need_cells=False)  # 0 genes: not "names lost"
    if gene_id_mode == "raw":
        return raw_gene_ids(adata.var, gene_key=gene_key, source=source)
    return resolve_gene_ids(adata.var, gene_key=gene_key, gene_table=gene_table, source=source)


def gene_keys(
    adata: ad.AnnData,
    gene_key: str | None = None,
    *,
    source: str = "data",
    gene_id_mode: Literal["resolve", "raw"] = "resolve",
    gene_table: str | os.PathLike | None = None,
) -> pd.Index:
    """The vocabulary key of each of ``adata``'s genes (None where a gene has no usable identifier)."""
    resolution = resolve_genes(adata, gene_key, source=source, gene_id_mode=gene_id_mode, gene_table=gene_table)
    return pd.Index(resolution.keys, dtype=object)


def gene_counts(adata: ad.AnnData, layer: str | None = None, chunk_size: int = 4096) -> np.ndarray:
    """(genes,) float64 total count of each gene over all cells (computed chunk by chunk)."""
    totals = np.zeros(adata.n_vars, dtype=np.float64)
    matrix = count_matrix(adata, layer)
    for start in range(0, adata.n_obs, chunk_size):
        totals += column_totals(to_csr(matrix[start : start + chunk_size]))
    return totals


def column_totals(counts: sp.csr_matrix) -> np.ndarray:
    """(genes,) float64 sum of each column of a CSR matrix."""
    return np.bincount(counts.indices, weights=counts.data, minlength=counts.shape[1])


def cells_expressing(adata: ad.AnnData, layer: str | None = None, chunk_size: int = 4096) -> np.ndarray:
    """Per gene, the number of cells with a non-zero count (computed chunk by chunk)."""
    n_cells = np.zeros(adata.n_vars, dtype=np.int64)
    matrix = count_matrix(adata, layer)
    for start in range(0, adata.n_obs, chunk_size):
        block = to_csr(matrix[start : start + chunk_size])
        n_cells += np.bincount(block.indices[block.data != 0], minlength=adata.n_vars)
    return n_cells


def build_vocab(
    datas: list[ad.AnnData],
    *,
    gene_key: str | None = None,
    specials=("<pad>", "<cls>", "<mask>"),
    sources: list[str] | None = None,
    gene_id_mode: Literal["resolve", "raw"] = "resolve",
    gene_table: str | os.PathLike | None = None,
    min_cells: int = 0,
    layer: str | None = None,
) -> GeneVocab:
    """A vocabulary over the union of the inputs' gene keys (sorted, so it does not depend on file order).

    With ``min_cells`` > 0, a gene enters only if at least that many cells (over all inputs) count it: a
    pretrained model barely trains the embedding of a gene it (almost) never sees, and such rows would only add
    weight to the folder.

    Raises :class:`InputError` naming a file none of whose genes has a usable identifier (e.g. var
    names ``'0', '1', ...``), since such a file can share no token with the others.
    """
    sources = sources or [f"data[{i}]" for i in range(len(datas))]
    cells_per_key: dict[str, int] = {}
    for adata, source in zip(datas, sources):
        resolution = resolve_genes(adata, gene_key, source=source, gene_id_mode=gene_id_mode, gene_table=gene_table)
        require_identifiers(resolution, source)
        n_cells = cells_expressing(adata, layer) if min_cells > 0 else np.zeros(adata.n_vars, dtype=np.int64)
        for key, n in zip(resolution.keys, n_cells.tolist()):
            if key is not None:
                cells_per_key[key] = cells_per_key.get(key, 0) + n
    return GeneVocab.from_gene_lists([[k for k, n in cells_per_key.items() if n >= min_cells]], specials=specials)


def vocab_of_tokens(
    datas: list[ad.AnnData],
    tokenizer: CellTokenizer,
    *,
    min_cells: int = 1,
    gene_key: str | None = None,
    layer: str | None = None,
    sources: list[str] | None = None,
) -> GeneVocab:
    """``tokenizer``'s vocabulary cut to the genes that are a token (one of the genes it keeps for a cell: its
    ``max_seq_len`` most expressed) in at least ``min_cells`` cells of ``datas``; the specials stay.

    A gene expressed in many cells but never among a cell's kept genes never enters the model, so pretraining
    never trains its embedding row; the cut keeps only rows that pretraining trains. With ``min_cells=1`` no
    cell's tokens change, since a dropped gene was never kept for any cell.
    """
    cells_as_token = cells_with_token(datas, tokenizer, gene_key=gene_key, layer=layer, sources=sources)
    vocab = tokenizer.vocab
    kept = [gene for gene in vocab.genes if cells_as_token[vocab.token_to_id[gene]] >= min_cells]
    return GeneVocab(kept, specials=vocab.specials)


def cells_with_token(datas: list[ad.AnnData], tokenizer: CellTokenizer, *, gene_key: str | None = None,
                     layer: str | None = None, sources: list[str] | None = None) -> np.ndarray:
    """(vocabulary,) int64: for each token id, the cells of ``datas`` whose tokens include it."""
    sources = sources or [f"data[{i}]" for i in range(len(datas))]
    counts = np.zeros(len(tokenizer.vocab), dtype=np.int64)
    for adata, source in zip(datas, sources):
        cells = tokenize_anndata(adata, tokenizer, layer=layer, gene_key=gene_key, source=source).cells
        counts += np.bincount(cells.gene_ids, minlength=len(counts))  # a gene is a token once per cell
    return counts


@dataclass
class TokenizedData:
    """Tokenized cells of one input together with their obs rows."""

    cells: TokenizedCells
    obs: pd.DataFrame
    report: TokenizeReport


def tokenize_anndata(
    adata: ad.AnnData,
    tokenizer: CellTokenizer,
    *,
    layer: str | None = None,
    gene_key: str | None = None,
    chunk_size: int = 2048,
    source: str = "data",
    cell_offset: int = 0,
) -> TokenizedData:
    """Tokenize every cell of ``adata`` chunk by chunk (works on backed AnnData).

    Parameters
    ----------
    adata
        Raw counts in ``X`` or ``layers[layer]``.
    tokenizer
        Tokenizer whose vocabulary the genes are looked up in; its config's ``gene_id_mode`` and
        ``gene_table`` say how gene identifiers are resolved.
    layer, gene_key
        Where counts and gene identifiers are.
    chunk_size
        Cells read at a time from a backed file; memory is bounded by it. An in-memory CSR matrix is
        tokenized in place, in blocks of 1,024 cells, without copying it.
    source
        Name used in messages and reports.
    cell_offset
        Added to row numbers in the subsampling hash, so cells of different files differ.

    Returns
    -------
    The tokenized cells (empty cells dropped and counted), their obs rows, and a report with the gene
    resolution routes and the overlap with the vocabulary.
    """
    resolution, column_ids = _columns_in_vocab(adata, tokenizer, gene_key=gene_key, source=source)
    totals = np.zeros(adata.n_vars, dtype=np.float64)  # (genes,) counts: the overlap check and expressed genes
    matrix = count_matrix(adata, layer)
    if sp.issparse(matrix) and matrix.format == "csr" and adata.n_obs:  # in memory: no chunk copies
        counts = to_csr(matrix)
        check_counts(counts, source=source, layer=layer)
        cells = np.arange(adata.n_obs) + cell_offset
        parts = [tokenizer.encode(counts, column_ids, cell_index=cells)]
        parts[0].cell_index = parts[0].cell_index - cell_offset
        totals += column_totals(counts)
    else:
        parts = []
        for chunk in iter_count_chunks(adata, layer=layer, chunk_size=chunk_size, source=source):
            parts.append(_encode_chunk(tokenizer, chunk, column_ids, cell_offset))
            totals += column_totals(chunk.counts)
    overlap = tokenizer.check_overlap(column_ids, source=source, gene_counts=totals)
    expressed = totals > 0  # counts are checked non-negative, so a positive total is a gene with a count
    resolution.set_expressed(expressed)
    cells = parts[0] if len(parts) == 1 else TokenizedCells.concatenate(parts)
    report = TokenizeReport(
        source=source,
        n_cells=adata.n_obs,
        n_cells_kept=len(cells),
        n_empty_dropped=cells.n_empty_dropped,
        n_genes=adata.n_vars,
        n_genes_in_vocab=int((column_ids >= 0).sum()),
        overlap=overlap,
        dropped_genes=list(resolution.names[(column_ids < 0) & expressed][:50]),
        gene_ids=resolution.report,
    )
    if len(cells) == 0:
        raise InputError(f"{source}: no cell has counts on the vocabulary's genes; nothing to tokenize.")
    obs = adata.obs.iloc[cells.cell_index]
    return TokenizedData(cells=cells, obs=obs, report=report)


def _columns_in_vocab(adata: ad.AnnData, tokenizer: CellTokenizer, *, gene_key: str | None, source: str):
    """Resolve the genes and look them up; a file sharing no gene with the vocabulary is an error."""
    cfg = tokenizer.config
    resolution = resolve_genes(adata, gene_key, source=source, gene_id_mode=cfg.gene_id_mode, gene_table=cfg.gene_table)
    require_identifiers(resolution, source)
    return resolution, vocab_column_ids(tokenizer, resolution.keys, source=source)


def vocab_column_ids(tokenizer: CellTokenizer, keys, *, source: str) -> np.ndarray:
    """Vocabulary id of each gene key (-1: not in the vocabulary); a file sharing no gene with it is an error."""
    column_ids = tokenizer.column_ids(keys)
    if not (column_ids >= 0).any():
        examples = ", ".join(repr(k) for k in keys[:3])
        raise InputError(
            f"{source}: no overlap with the vocabulary: none of its {len(column_ids)} genes (keys {examples}, ...) "
            "is a vocabulary gene. Check that var names (or gene_key / --gene-key) hold gene symbols or Ensembl IDs "
            "of the model's species, or pass a gene table (tokenizer.gene_table) for another species."
        )
    return column_ids


def _encode_chunk(tokenizer: CellTokenizer, chunk, column_ids: np.ndarray, cell_offset: int) -> TokenizedCells:
    rows = np.arange(chunk.start, chunk.start + chunk.counts.shape[0])
    part = tokenizer.encode(chunk.counts, column_ids, cell_index=rows + cell_offset)
    part.cell_index = part.cell_index - cell_offset  # keep row numbers local to this input
    return part


def iter_tokenized(adata: ad.AnnData, tokenizer: CellTokenizer, column_ids: np.ndarray, *, layer: str | None = None,
                   chunk_size: int = 2048, source: str = "data", cell_offset: int = 0):
    """Yield ``(start, TokenizedCells)`` chunk by chunk; ``cell_index`` stays local to ``adata``."""
    for chunk in iter_count_chunks(adata, layer=layer, chunk_size=chunk_size, source=source):
        yield chunk.start, _encode_chunk(tokenizer, chunk, column_ids, cell_offset)


def column_token_ids(adata: ad.AnnData, tokenizer: CellTokenizer, *, layer: str | None = None, gene_key: str | None = None,
                     source: str = "data") -> np.ndarray:
    """Vocabulary id of each of ``adata``'s genes (-1 if unknown), after the overlap check."""
    _, column_ids = _columns_in_vocab(adata, tokenizer, gene_key=gene_key, source=source)
    tokenizer.check_overlap(column_ids, source=source, gene_counts=gene_counts(adata, layer))
    return column_ids


def open_inputs(paths: list[str | os.PathLike]) -> list[tuple[str, ad.AnnData]]:
    """Open every h5ad named by ``--data`` arguments (files or folders) backed and read-only."""
    return [(str(p), read_h5ad(p, backed=True)) for p in expand_data_paths(paths)]


def input_stem(path: str | os.PathLike) -> str:
    """File name without ``.h5ad`` (and without a ``.rna`` suffix), used for outputs and reports."""
    name = Path(path).name
    for suffix in (".h5ad", ".rna"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name
