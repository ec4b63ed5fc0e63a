"""Cell tokenizers: from a CSR count matrix to ragged (gene id, value) sequences, vectorised over cells.

Three kinds share one interface (:class:`CellTokenizer`), selected by ``TokenizerConfig.kind``:

- ``binned`` (scGPT): per cell, counts are normalised to ``target_sum`` and log1p-transformed; bin edges
  are the quantiles of that cell's non-zero values (``n_bins - 1`` edges, numpy's linear method) and a
  value's bin is the number of edges at or below it, so bins run 1..n_bins-1 and 0 means zero. scGPT
  breaks ties between equal edges with ``np.random.rand``; here a value equal to edges ``j..k`` gets
  the middle bin of the range scGPT draws from, so tokenization is reproducible.
- ``continuous``: the log1p of the normalised counts.
- ``rank`` (Geneformer): counts / cell total x 10,000 / the gene's non-zero median over the corpus,
  genes sorted by that value descending; the value carried is the normalised expression.

When a cell expresses more genes than ``max_seq_len``, the genes with the largest counts are kept
(``selection="top"``; among equal counts the first columns), or a subset chosen by a counter-based
hash of (seed, cell, gene) (``selection="subsample"``), so the choice does not depend on chunking.
Rank-value input always keeps the top genes. Genes keep the input's column order within a cell
(binned, continuous) or are sorted by rank (rank). Columns that share a vocabulary id (two names of
one gene) are summed per cell.

Everything is vectorised over the cells of a chunk, without a Python loop over cells: per-entry work
is a few numpy passes, per-cell work (quantile edges, the top-k threshold) is done on each cell's
distinct counts (:mod:`.binning`), the subsample is a radix select over bincounts, and only rank-value
input sorts entries (one packed uint64 sort).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .anndata_io import InputError
from .binning import CountGroups, binned_tokens, quantile_bins  # noqa: F401  (quantile_bins is part of this module's API)
from .gene_ids import GeneIdReport
from .vocab import GeneVocab

logger = logging.getLogger(__name__)

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENE_MEDIANS_FILE = "gene_medians.json"
_MAX_ROWS = 1 << 10
"""Rows encoded at once: bounds the temporaries (30-70 bytes per non-zero count, 43-92 MB for 1,024 cells
of 1,300 genes) and the (rows, 256) selection histograms; sort keys hold rows in 16 bits."""


@dataclass(frozen=True)
class TokenizerConfig:
    """How cells become token sequences."""

    kind: Literal["binned", "continuous", "rank"] = "binned"
    """Value encoding: scGPT-style bins, continuous log1p values, or Geneformer-style rank order."""
    n_bins: int = 51
    """Number of value bins including bin 0 for zero (binned only)."""
    max_seq_len: int = 1200
    """Most genes per cell, not counting the <cls> token."""
    selection: Literal["subsample", "top"] = "top"
    """Genes kept when a cell expresses more than max_seq_len: the top expressed (default) or a seeded subsample."""
    seed: int = 0
    """Seed of the gene subsampling hash."""
    target_sum: float = 1e4
    """Library size that counts are normalised to before log1p / ranking."""
    min_overlap: float = 0.1
    """Fraction of a file's counts that must be on vocabulary genes; below it is an error."""
    warn_overlap: float = 0.5
    """Below this overlap a warning is printed."""
    special_tokens: tuple[str, ...] = ("<pad>", "<cls>", "<mask>")
    """Special tokens of the vocabulary built for this tokenizer (extra ones such as <eoc> may be added)."""
    gene_id_mode: Literal["resolve", "raw"] = "resolve"
    """Vocabulary keys: canonical gene IDs resolved through gene tables (docs/tokenization.md), or raw names."""
    gene_table: str | None = None
    """TSV of another species' gene IDs or an ortholog mapping, consulted before the human table."""

    def __post_init__(self):
        if self.kind == "binned" and not 3 <= self.n_bins <= 32768:
            raise ValueError(f"n_bins must be between 3 and 32768, got {self.n_bins}")
        if self.gene_id_mode not in ("resolve", "raw"):
            raise ValueError(f"gene_id_mode must be 'resolve' or 'raw', got {self.gene_id_mode!r}")
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be positive, got {self.max_seq_len}")
        if not 0 <= self.min_overlap <= self.warn_overlap <= 1:
            raise ValueError("need 0 <= min_overlap <= warn_overlap <= 1")


@dataclass
class TokenizedCells:
    """Ragged token sequences of many cells (without <cls>; the collator adds it).

    Cell ``i`` owns entries ``offsets[i]:offsets[i+1]`` of ``gene_ids`` and ``values``.
    """

    offsets: np.ndarray
    """(cells + 1,) int64 start of each cell's tokens."""
    gene_ids: np.ndarray
    """(tokens,) int32 vocabulary ids."""
    values: np.ndarray
    """(tokens,) float32 bin index, log1p value, or normalised expression (rank)."""
    cell_index: np.ndarray
    """(cells,) int64 row of each kept cell in its input; empty cells are dropped."""
    n_empty_dropped: int = 0
    """Cells dropped because none of their counts fell on vocabulary genes."""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.gene_ids[lo:hi], self.values[lo:hi]

    def subset(self, rows: np.ndarray) -> TokenizedCells:
        """The cells at positions ``rows`` (in that order)."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        take = _ragged_ranges(self.offsets[rows], lengths)
        return TokenizedCells(offsets, self.gene_ids[take], self.values[take], self.cell_index[rows], 0)

    @staticmethod
    def concatenate(parts: list[TokenizedCells]) -> TokenizedCells:
        lengths = np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return TokenizedCells(
            offsets,
            np.concatenate([p.gene_ids for p in parts]) if parts else np.zeros(0, np.int32),
            np.concatenate([p.values for p in parts]) if parts else np.zeros(0, np.float32),
            np.concatenate([p.cell_index for p in parts]) if parts else np.zeros(0, np.int64),
            sum(p.n_empty_dropped for p in parts),
        )


def _ragged_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each (s, n), without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    first = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=first[1:])
    return starts[row_of] + (np.arange(total) - first[row_of])


def _splitmix64(seed: int, a: np.ndarray, b: np.ndarray | int = 0) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = z + np.asarray(a).astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
        z = z + np.asarray(b).astype(np.uint64) * np.uint64(0x94D049BB133111EB)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def selection_scores(cell_hash: np.ndarray, gene_hash: np.ndarray) -> np.ndarray:
    """(entries,) uint32 pseudo-random scores of (cell, gene) pairs: murmur3's fmix32 of cell ^ gene hash.

    ``cell_hash`` and ``gene_hash`` are per entry (uint32 splitmix64 hashes of (seed, cell index) and
    (seed, gene id)); the final mix decorrelates the orders of different cells.
    """
    with np.errstate(over="ignore"):
        x = cell_hash ^ gene_hash
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x85EBCA6B)
        x ^= x >> np.uint32(13)
        x *= np.uint32(0xC2B2AE35)  # fmix32 without its last shift: the order is read from the top bits
    return x


def uint32_hash(seed: int, ids: np.ndarray, stream: int) -> np.ndarray:
    """Top 32 bits of splitmix64(seed, ids, stream) as uint32."""
    return (_splitmix64(seed, ids, stream) >> np.uint64(32)).astype(np.uint32)


def smallest_in_rows(row_ptr: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of the ``k`` entries with the smallest uint32 ``score`` in each row (ties: first position).

    ``row_ptr`` (rows + 1,) delimits contiguous rows of ``score``, every row longer than ``k``. A radix
    select: each pass histograms one byte of the candidates' scores per row, keeps the entries below
    the byte holding the k-th smallest and narrows the candidates to that byte; once every row's
    candidates are tied they are taken in position order. Histograms, masks, no sort.
    """
    n_rows = len(row_ptr) - 1
    keep = np.zeros(len(score), dtype=bool)
    candidates = None  # all entries
    per_row = np.diff(row_ptr)  # (rows,) candidates of each row, contiguous
    need = np.full(n_rows, k, dtype=np.int64)  # (rows,) entries still to take from the candidates
    row_ids = np.arange(n_rows)
    for shift in (24, 16, 8, 0):
        cand_score = score if candidates is None else score[candidates]
        starts = np.cumsum(per_row) - per_row
        if candidates is not None and np.array_equal(cand_score, np.repeat(cand_score[starts], per_row)):
            break  # every row's candidates are tied
        byte = ((cand_score >> np.uint32(shift)) & np.uint32(0xFF)).astype(np.int32)
        ptr = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
        hist = sp.csr_matrix((np.ones(len(byte), dtype=np.int32), byte, ptr), shape=(n_rows, 256)).toarray()
        cum = np.cumsum(hist, axis=1)
        threshold = np.argmax(cum >= need[:, None], axis=1)  # (rows,) byte holding the k-th smallest
        need -= cum[row_ids, threshold] - hist[row_ids, threshold]
        row_threshold = np.repeat(threshold.astype(np.int32), per_row)
        below = np.flatnonzero(byte < row_threshold)
        keep[below if candidates is None else candidates[below]] = True
        tied = np.flatnonzero(byte == row_threshold)
        candidates = tied if candidates is None else candidates[tied]
        per_row = hist[row_ids, threshold]
    first = np.cumsum(per_row) - per_row  # (rows,) each row's first candidate
    rank = np.arange(len(candidates)) - np.repeat(first, per_row)
    keep[candidates[rank < np.repeat(need, per_row)]] = True
    return keep


def order_within_rows(row_ptr: np.ndarray, row_of: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entry indices sorted by row, then ascending uint32 ``score``, then position (one uint64 sort).

    The key packs row (16 bits), score (32) and position within the row (16 bits); more rows or longer
    rows fall back to a stable lexsort. Also returns the bool (entries - 1,) mask of sorted neighbours
    that share row and score.
    """
    starts = row_ptr[:-1]
    position = np.arange(len(row_of), dtype=np.int64) - starts[row_of]
    if len(starts) > 0xFFFF or (len(position) and position.max() > 0xFFFF):
        order = np.lexsort((score, row_of))
        return order, (row_of[order][1:] == row_of[order][:-1]) & (score[order][1:] == score[order][:-1])
    key = (row_of.astype(np.uint64) << np.uint64(48)) | (score.astype(np.uint64) << np.uint64(16))
    key |= position.astype(np.uint64)
    key.sort()
    order = starts[(key >> np.uint64(48)).astype(np.int64)] + (key & np.uint64(0xFFFF)).astype(np.int64)
    key >>= np.uint64(16)  # row and score
    return order, key[1:] == key[:-1]


def _exact_order_within_ties(order: np.ndarray, tied: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Reorder runs of entries whose uint32 scores tie within a row by their exact (float64) value.

    ``order`` is sorted by row, then descending float32 value, then position, and ``tied[i]`` says that
    sorted entries i and i + 1 share row and score. Only runs whose exact values differ are sorted again
    (stably, descending), so exactly equal values keep position order.
    """
    if not tied.any():
        return order
    in_run = np.zeros(len(order), dtype=bool)
    in_run[1:] |= tied
    in_run[:-1] |= tied
    members = np.flatnonzero(in_run)  # positions in `order` belonging to some run
    new_run = np.concatenate([[True], ~tied[members[1:] - 1]])  # consecutive members, same run
    member_value = value[order[members]]
    starts = np.flatnonzero(new_run)
    mixed = np.maximum.reduceat(member_value, starts) != np.minimum.reduceat(member_value, starts)
    run_id = np.cumsum(new_run) - 1
    members = members[mixed[run_id]]  # runs of exactly equal values are already in position order
    if not len(members):
        return order
    resorted = members[np.lexsort((-value[order[members]], run_id[mixed[run_id]]))]
    order = order.copy()
    order[members] = order[resorted]
    return order


def descending_score(values: np.ndarray) -> np.ndarray:
    """uint32 scores that order non-negative float32 values descending (inverted IEEE bit patterns)."""
    return ~np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)


@dataclass
class _Rows:
    """A block of consecutive CSR rows as array views (``indptr`` rebased to 0, int64)."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray


@dataclass
class _Entries:
    """Non-zero counts of one block on vocabulary genes, cells without any removed."""

    row_ptr: np.ndarray  # (rows + 1,) int64
    gene_ids: np.ndarray  # (nnz,) int32
    counts: np.ndarray  # (nnz,) float32
    totals: np.ndarray  # (rows,) float32 library size over all genes
    cell_index: np.ndarray  # (rows,) int64
    n_empty: int

    @functools.cached_property
    def row_of(self) -> np.ndarray:
        """(nnz,) int32 row of each entry (built only by the paths that need it)."""
        return _rows_of(self.row_ptr)


def _rows_of(row_ptr: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(row_ptr) - 1, dtype=np.int32), np.diff(row_ptr))


def _canonical_csr(counts) -> sp.csr_matrix:
    """float32 CSR with sorted, unique column indices (copied only when needed)."""
    counts = counts if sp.issparse(counts) and counts.format == "csr" else sp.csr_matrix(counts)
    if counts.dtype != np.float32:
        counts = counts.astype(np.float32)
    if not counts.has_canonical_format:
        counts = counts.copy()
        counts.sum_duplicates()
    return counts


def _row_sums(values: np.ndarray, indptr: np.ndarray, dtype=None) -> np.ndarray:
    """(rows,) sums of each CSR row's values (float32 counts: exact below 2**24 per cell)."""
    lengths = np.diff(indptr)
    if len(values) == 0:
        return np.zeros(len(lengths), dtype=dtype or values.dtype)
    sums = np.add.reduceat(values, np.minimum(indptr[:-1], len(values) - 1), dtype=dtype)
    sums[lengths == 0] = 0
    return sums


def _merge_duplicate_genes(row_of: np.ndarray, gene_ids: np.ndarray, counts: np.ndarray, dup_entries: np.ndarray):
    """Sum entries of one cell that share a gene id into the first of them; returns a keep mask."""
    key = row_of[dup_entries].astype(np.int64) * np.int64(1 << 31) + gene_ids[dup_entries]
    order = np.argsort(key, kind="stable")  # groups contiguous, first = earliest column
    sorted_key = key[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    sums = np.add.reduceat(counts[dup_entries][order], np.flatnonzero(first))
    counts[dup_entries[order][first]] = sums
    keep = np.ones(len(counts), dtype=bool)
    keep[dup_entries[order][~first]] = False
    return keep


class CellTokenizer:
    """Turns count matrices into token sequences over a :class:`GeneVocab`.

    Parameters
    ----------
    vocab
        Gene vocabulary; its ids are the model's input ids.
    config
        Tokenizer settings.
    gene_medians
        (rank only) gene key -> non-zero median of normalised expression over the corpus.
    """

    def __init__(self, vocab: GeneVocab, config: TokenizerConfig | None = None, gene_medians: dict[str, float] | None = None):
        self.vocab = vocab
        self.config = config or TokenizerConfig()
        self.gene_medians = gene_medians
        if self.config.kind == "rank" and gene_medians is None:
            raise InputError("the rank tokenizer needs gene medians; compute them with gene_nonzero_medians first.")
        self._median_by_id = None
        if gene_medians is not None:
            med = np.ones(len(vocab), dtype=np.float64)  # genes never expressed in the corpus: median 1
            ids = vocab.lookup(gene_medians.keys())
            known = ids >= 0
            med[ids[known]] = np.asarray(list(gene_medians.values()), dtype=np.float64)[known]
            if not np.all(med > 0):
                raise InputError("gene medians must be positive; recompute them with gene_nonzero_medians.")
            self._median_by_id = med
        self._gene_hash = uint32_hash(self.config.seed, np.arange(len(vocab)), stream=2)  # (vocab,) uint32

    # ---------------------------------------------------------------- genes
    def column_ids(self, gene_keys) -> np.ndarray:
        """(genes,) int64 vocabulary id of each key; -1 for unknown keys and for None (dropped genes)."""
        keys = pd.Index(gene_keys, dtype=object)
        missing = keys.isna()
        ids = self.vocab.lookup(keys.where(~missing, "") if missing.any() else keys)
        ids[missing] = -1
        return ids

    def check_overlap(self, ids: np.ndarray, *, source: str, gene_counts: np.ndarray) -> float:
        """The fraction of a file's counts that fall on vocabulary genes, given each column's vocabulary id
        (``ids``, -1 unknown) and total count (``gene_counts``): below ``min_overlap`` an error, below
        ``warn_overlap`` a warning.

        Counts weigh the genes because a model sees a cell through its most expressed genes: a vocabulary of the
        genes that are ever among a cell's tokens leaves out thousands of rarely expressed genes that cost nothing.
        """
        known = np.asarray(ids) >= 0
        gene_counts = np.asarray(gene_counts, dtype=np.float64)
        total = gene_counts.sum()
        overlap = float(gene_counts[known].sum() / total) if total > 0 else 0.0
        expressed = gene_counts > 0
        what = (f"only {overlap:.1%} of its counts are on genes in the model's vocabulary "
                f"({int((known & expressed).sum())} of its {int(expressed.sum())} expressed genes)")
        if overlap < self.config.min_overlap:
            raise InputError(
                f"{source}: {what} (minimum {self.config.min_overlap:.0%}). Check that var names (or --gene-key) hold "
                "gene symbols or Ensembl IDs of the model's species, or train a vocabulary from scratch."
            )
        if overlap < self.config.warn_overlap:
            logger.warning(f"warning: {source}: {what}.")
        return overlap

    # ---------------------------------------------------------------- encode
    def encode(self, counts: sp.csr_matrix, column_ids: np.ndarray, cell_index: np.ndarray | None = None) -> TokenizedCells:
        """Tokenize a (cells, genes) CSR count matrix whose columns map to ``column_ids`` (-1 = drop).

        ``cell_index`` gives each row a global id, used in the subsampling hash and kept in the output.
        Columns sharing an id are summed per cell; cells without counts on known genes are dropped and
        counted.
        """
        counts = _canonical_csr(counts)
        if cell_index is None:
            cell_index = np.arange(counts.shape[0], dtype=np.int64)
        cell_index = np.asarray(cell_index, dtype=np.int64)
        column_ids = np.asarray(column_ids)
        if len(column_ids) != counts.shape[1]:
            raise InputError(f"{len(column_ids)} column ids for a matrix of {counts.shape[1]} genes.")
        if self._compiled_path(column_ids):
            return self._encode_binned_top(counts, column_ids, cell_index)
        indptr = counts.indptr.astype(np.int64)
        parts = []
        for lo in range(0, counts.shape[0], _MAX_ROWS):  # blocks bound the temporaries; views, no copies
            hi = min(lo + _MAX_ROWS, counts.shape[0])
            start, stop = indptr[lo], indptr[hi]
            block = _Rows(indptr[lo:hi + 1] - start, counts.indices[start:stop], counts.data[start:stop])
            parts.append(self._encode_block(block, column_ids, cell_index[lo:hi]))
        return parts[0] if len(parts) == 1 else TokenizedCells.concatenate(parts)

    def _compiled_path(self, column_ids: np.ndarray) -> bool:
        """Binned tokens of the top genes with no two columns on one gene: two compiled passes do it all."""
        cfg = self.config
        if cfg.kind != "binned" or cfg.selection != "top":
            return False
        known = column_ids[column_ids >= 0]
        return len(known) == 0 or np.bincount(known).max() == 1

    def _encode_binned_top(self, counts: sp.csr_matrix, column_ids: np.ndarray, cell_index: np.ndarray) -> TokenizedCells:
        kept, offsets, gene_ids, bins = binned_tokens(
            counts.indptr, counts.indices, counts.data, column_ids.astype(np.int32, copy=False),
            target_sum=self.config.target_sum, n_bins=self.config.n_bins, max_len=self.config.max_seq_len)
        return TokenizedCells(offsets, gene_ids, bins, cell_index[kept], n_empty_dropped=counts.shape[0] - len(kept))

    def _encode_block(self, counts: _Rows, column_ids: np.ndarray, cell_index: np.ndarray) -> TokenizedCells:
        entries = self._entries(counts, column_ids, cell_index)
        values, take = self._values(entries)  # take: None, a keep mask (column order) or indices (rank order)
        lengths = np.minimum(np.diff(entries.row_ptr), self.config.max_seq_len)  # exactly k kept in long cells
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return TokenizedCells(
            offsets=offsets,
            gene_ids=entries.gene_ids if take is None else entries.gene_ids[take],
            values=(values if take is None else values[take]).astype(np.float32, copy=False),
            cell_index=entries.cell_index,
            n_empty_dropped=entries.n_empty,
        )

    def _entries(self, counts: _Rows, column_ids: np.ndarray, cell_index: np.ndarray) -> _Entries:
        """Entries on vocabulary genes with duplicates merged; empty cells removed."""
        indptr = counts.indptr
        data = counts.data
        totals = _row_sums(data, indptr).astype(np.float32)  # library size over all genes
        ids32 = column_ids.astype(np.int32)
        columns = counts.indices.astype(np.intp)  # (nnz,) once, for the gathers below
        gene_ids = np.take(ids32, columns)  # (nnz,)
        lengths = np.diff(indptr)
        keep = None if ids32.min(initial=0) >= 0 else gene_ids >= 0
        nonzero = data.all()
        if not nonzero:  # explicit zeros are not expressed genes
            keep = data != 0 if keep is None else keep & (data != 0)
        known_ids = ids32[ids32 >= 0]
        if len(known_ids) and np.bincount(known_ids).max() > 1:  # two columns of one gene: sum them
            shared = np.isin(ids32, np.flatnonzero(np.bincount(known_ids) > 1))
            in_shared = np.take(shared, columns)
            dup_entries = np.flatnonzero(in_shared if keep is None else in_shared & keep)
            data = data.copy()
            merged = _merge_duplicate_genes(_rows_of(indptr), gene_ids, data, dup_entries)
            keep = merged if keep is None else keep & merged
        if keep is not None:
            lengths = _row_sums(keep.view(np.int8), indptr, dtype=np.int64)
            gene_ids, data = gene_ids[keep], data[keep]
        nonempty = lengths > 0
        n_empty = int(len(lengths) - nonempty.sum())
        if n_empty:  # empty cells own no entries: dropping them leaves the entries as they are
            lengths, totals, cell_index = lengths[nonempty], totals[nonempty], cell_index[nonempty]
        row_ptr = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=row_ptr[1:])
        return _Entries(row_ptr, gene_ids, data, totals, cell_index, n_empty)

    def _values(self, e: _Entries) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-entry token values, and which entries to keep: None (all), a mask, or rank-ordered indices."""
        cfg = self.config
        scale = (e.totals / np.float32(cfg.target_sum)).astype(np.float32)  # (rows,) normalize_total factor
        if cfg.kind == "rank":
            # Geneformer's arithmetic, in float64: count / n_counts * target_sum / median
            norm = e.counts / e.totals.astype(np.float64)[e.row_of] * cfg.target_sum  # (nnz,)
            ratio = norm / self._median_by_id[e.gene_ids]
            order, tied = order_within_rows(e.row_ptr, e.row_of, descending_score(ratio.astype(np.float32)))
            order = _exact_order_within_ties(order, tied, ratio)
            rank = np.arange(len(order)) - np.repeat(e.row_ptr[:-1], np.diff(e.row_ptr))
            return norm.astype(np.float32), order[rank < cfg.max_seq_len]
        shorten = len(e.row_ptr) > 1 and np.diff(e.row_ptr).max() > cfg.max_seq_len
        top = shorten and cfg.selection == "top"
        counts = np.rint(e.counts).astype(np.int32) if cfg.kind == "binned" or top else None
        groups = CountGroups.build(counts, e.row_ptr) if counts is not None else None
        values = groups.bins(scale, cfg.n_bins, np.float32) if cfg.kind == "binned" else np.log1p(e.counts / scale[e.row_of])
        if not shorten:
            return values, None
        # within a cell the value rises with the count, so the top genes are those with the largest counts
        return values, groups.top_k(cfg.max_seq_len) if top else self._subsample(e)

    def _subsample(self, e: _Entries) -> np.ndarray:
        """Keep mask: max_seq_len genes of each longer cell, chosen by a hash of (seed, cell, gene)."""
        k = self.config.max_seq_len
        lengths = np.diff(e.row_ptr)
        long_rows = np.flatnonzero(lengths > k)
        is_long = np.zeros(len(lengths), dtype=bool)
        is_long[long_rows] = True
        sub_entries = np.flatnonzero(np.take(is_long, e.row_of))  # entries of the cells to shorten, rows contiguous
        sub_row = np.repeat(np.arange(len(long_rows), dtype=np.int32), lengths[long_rows])
        cell_hash = uint32_hash(self.config.seed, e.cell_index[long_rows], stream=1)
        score = selection_scores(cell_hash[sub_row], self._gene_hash[e.gene_ids[sub_entries]])
        sub_ptr = np.concatenate([[0], np.cumsum(lengths[long_rows])])
        keep = np.ones(len(e.row_of), dtype=bool)
        keep[sub_entries] = smallest_in_rows(sub_ptr, score, k)
        return keep

    # ---------------------------------------------------------------- persistence
    def save(self, folder: str | os.PathLike) -> None:
        """Write ``vocab.json``, ``tokenizer_config.json`` and (rank) ``gene_medians.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.vocab.save(folder)
        cfg = asdict(self.config)
        cfg["special_tokens"] = list(cfg["special_tokens"])
        (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
        if self.gene_medians is not None:
            (folder / GENE_MEDIANS_FILE).write_text(json.dumps(self.gene_medians))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Hugging Face spelling of :meth:`save`: ``model.save_pretrained(d); tokenizer.save_pretrained(d)``."""
        self.save(folder)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> CellTokenizer:
        """Load a tokenizer saved by :meth:`save` (a model folder)."""
        folder = Path(folder)
        path = folder / TOKENIZER_CONFIG_FILE
        if not path.exists():
            raise InputError(f"{folder}: {TOKENIZER_CONFIG_FILE} missing; this is not a complete model folder.")
        raw = json.loads(path.read_text())
        known = {f for f in TokenizerConfig.__dataclass_fields__}
        unknown = set(raw) - known
        if unknown:
            raise InputError(f"{path}: unknown tokenizer settings {sorted(unknown)}; written by a newer atlasformer?")
        raw["special_tokens"] = tuple(raw.get("special_tokens", TokenizerConfig.special_tokens))
        medians = None
        if (folder / GENE_MEDIANS_FILE).exists():
            medians = json.loads((folder / GENE_MEDIANS_FILE).read_text())
        return cls(GeneVocab.load(folder), TokenizerConfig(**raw), gene_medians=medians)


@dataclass
class TokenizeReport:
    """What happened to one input while tokenizing."""

    source: str
    n_cells: int = 0
    n_cells_kept: int = 0
    n_empty_dropped: int = 0
    n_genes: int = 0
    n_genes_in_vocab: int = 0
    overlap: float = 0.0
    dropped_genes: list[str] = field(default_factory=list)
    """Expressed genes not in the vocabulary (first 50), as named in the file."""
    gene_ids: GeneIdReport | None = None
    """How the file's gene identifiers were resolved (routes, merged and dropped names)."""

    def summary(self) -> str:
        text = (
            f"{self.source}: {self.n_cells_kept}/{self.n_cells} cells kept ({self.n_empty_dropped} empty dropped), "
            f"{self.n_genes_in_vocab}/{self.n_genes} genes in vocabulary ({self.overlap:.1%} of the counts)"
        )
        return text if self.gene_ids is None else f"{text}\n  {self.gene_ids.summary()}"
