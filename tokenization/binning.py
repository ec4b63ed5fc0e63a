"""Per-cell quantile binning (scGPT's), vectorised over cells and exact to the bit.

scGPT bins a cell's non-zero log1p values at the edges ``np.quantile(nonzero, linspace(0, 1, n_bins - 1))``
and gives a value ``x`` a bin drawn at random from ``digitize(x, edges, right=True) + 1 ..
digitize(x, edges)``; the range has more than one bin only when ``x`` equals two or more edges (tied
values). Here the middle of that range is taken, so the result is reproducible and equals scGPT's
wherever scGPT's draw has a single choice.

The work is done on *groups* (distinct values of a cell with their multiplicity), not on entries: a
cell of raw counts has few distinct counts (most are 1, 2, 3, ...), so edges and bins are computed once
per distinct count and gathered back to the entries through a per-cell histogram table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

SMALL_COUNT = 64
"""Counts below this are grouped through a dense (cells, SMALL_COUNT + 1) histogram; larger ones by sorting."""


def quantile_positions(n: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy's 'linear' quantile indices for rows of ``n`` values at ``linspace(0, 1, n_bins - 1)``.

    Returns (prev, next, gamma), each (rows, n_bins - 1): the value of quantile q is
    ``lerp(sorted[prev], sorted[next], gamma)``. Computed once per distinct row length.
    """
    lengths, row_kind = np.unique(n, return_inverse=True)
    q = np.linspace(0, 1, n_bins - 1)  # (edges,)
    virtual = (lengths[:, None] - 1) * q[None, :]  # (lengths, edges) numpy's virtual index
    prev = np.floor(virtual)
    gamma = virtual - prev
    prev_i = prev.astype(np.int64)
    next_i = prev_i + 1
    at_end = virtual >= (lengths[:, None] - 1)
    last = np.broadcast_to(lengths[:, None] - 1, at_end.shape)
    prev_i[at_end] = last[at_end]
    next_i[at_end] = last[at_end]
    row_kind = row_kind.ravel()
    return prev_i[row_kind], next_i[row_kind], gamma[row_kind]


def quantile_edges(group_values: np.ndarray, group_end: np.ndarray, row_ptr: np.ndarray, n_bins: int):
    """Bin edges of every row, ``np.quantile(row, np.linspace(0, 1, n_bins - 1))`` to the bit.

    Parameters
    ----------
    group_values
        (groups,) float32 distinct values, ascending within each row, rows in order.
    group_end
        (groups,) int64 cumulative multiplicity: entry position (over all rows) just past each group.
    row_ptr
        (rows + 1,) int64 first entry position of each row; every row is non-empty.

    Returns
    -------
    edges
        (rows, n_bins - 1) float64.
    lower, upper
        (rows, n_bins - 1) int32 groups of the two values each edge interpolates between.
    a, b
        (rows, n_bins - 1) float32 their values.
    """
    prev_i, next_i, gamma = quantile_positions(np.diff(row_ptr), n_bins)
    # the value at a sorted position is that of the group whose entry range holds it
    group_at = np.repeat(np.arange(len(group_end), dtype=np.int32), np.diff(group_end, prepend=0))  # (nnz,)
    lower = group_at[row_ptr[:-1, None] + prev_i]  # (rows, edges)
    upper = group_at[row_ptr[:-1, None] + next_i]
    a, b = group_values[lower], group_values[upper]  # float32
    diff = b - a  # float32, as numpy's _lerp on a float32 array
    edges = np.add(a, diff * gamma)  # float64
    np.subtract(b, diff * (1 - gamma), out=edges, where=gamma >= 0.5)
    return edges, lower, upper, a, b


def group_bins(group_values: np.ndarray, group_row: np.ndarray, group_end: np.ndarray, row_ptr: np.ndarray,
               n_bins: int) -> np.ndarray:
    """Bin of each group: the middle of scGPT's range ``right + 1 .. left`` (a single bin unless tied).

    ``left`` (edges <= x) and ``right`` (edges < x) are counted without comparing every group with every
    edge: an edge lies between the values a <= b of its two (equal or adjacent) groups (numpy's two-sided
    lerp never leaves [a, b]), so "edge <= x" holds from one group on; cumulative counts over groups
    give both numbers for all groups at once.
    """
    edges, lower, upper, a, b = quantile_edges(group_values, group_end, row_ptr, n_bins)
    at_lower, at_upper = edges == a, edges == b
    first_ge = np.where(at_lower, lower, upper)  # first group with value >= edge
    first_gt = np.where(at_lower, lower + 1, np.where(at_upper, upper + 1, upper))  # first group > edge
    n_groups = len(group_values)
    n_edges = edges.shape[1]
    before = group_row.astype(np.int64) * n_edges  # edges of earlier rows, all at lower groups
    left = np.cumsum(np.bincount(first_ge.ravel(), minlength=n_groups + 1))[:n_groups] - before
    right = np.cumsum(np.bincount(first_gt.ravel(), minlength=n_groups + 1))[:n_groups] - before
    return (right + (left - right + 1) // 2).astype(np.int16)


def quantile_bins(values: np.ndarray, row_ptr: np.ndarray, n_bins: int) -> np.ndarray:
    """Per-row quantile bins of values sorted ascending within each row (any float32 values).

    Parameters
    ----------
    values
        (nnz,) float32, sorted ascending within each row.
    row_ptr
        (rows + 1,) start of each row in ``values``; every row is non-empty.
    n_bins
        Bins including 0; values get bins 1..n_bins-1.

    Returns
    -------
    (nnz,) int64 bins. Edges follow ``np.quantile(row, np.linspace(0, 1, n_bins - 1))`` to the bit.
    """
    n = np.diff(row_ptr)
    new_group = np.ones(len(values), dtype=bool)
    new_group[1:] = values[1:] != values[:-1]
    new_group[row_ptr[:-1]] = True
    starts = np.flatnonzero(new_group)
    group_of = np.cumsum(new_group) - 1  # (nnz,)
    group_end = np.append(starts[1:], len(values)).astype(np.int64)
    group_row = np.repeat(np.arange(len(n)), n)[starts]
    bins = group_bins(values[starts], group_row, group_end, row_ptr.astype(np.int64), n_bins)
    return bins.astype(np.int64)[group_of]


@dataclass
class CountGroups:
    """The distinct counts of every cell (groups), ascending within each cell, and how entries map to them.

    Built without sorting entries: counts below :data:`SMALL_COUNT` through a dense per-cell
    histogram, the rare larger ones through a sort of those entries only.
    """

    row_ptr: np.ndarray  # (rows + 1,) int64 entry range of each cell
    g_row: np.ndarray  # (groups,) cell of each group
    g_count: np.ndarray  # (groups,) the count
    g_end: np.ndarray  # (groups,) int64 entry position (over all cells) just past the group, in sorted order
    slot: np.ndarray  # (nnz,) intp row * (SMALL_COUNT + 1) + min(count, SMALL_COUNT)
    small_group: np.ndarray  # (groups below SMALL_COUNT,) group index of each (row, count) slot with entries
    small_slot: np.ndarray  # (same,) its slot
    large: np.ndarray  # (large entries,) entry indices with count >= SMALL_COUNT
    large_group: np.ndarray  # (large entries,) their group

    @classmethod
    def build(cls, counts: np.ndarray, row_ptr: np.ndarray) -> CountGroups:
        """``counts``: (nnz,) positive integer counts, cells contiguous; ``row_ptr``: (rows + 1,) int64."""
        n_rows = len(row_ptr) - 1
        width = SMALL_COUNT + 1  # column SMALL_COUNT collects the large counts
        capped = np.minimum(counts, SMALL_COUNT).astype(np.int32, copy=False)  # (nnz,)
        # per-cell histogram of the capped counts in one C++ pass: a CSR matrix with the capped count as
        # both column and value, densified (scipy sums entries sharing a column: count x multiplicity)
        summed = sp.csr_matrix((capped, capped, row_ptr.astype(np.int32)), shape=(n_rows, width)).toarray()
        slot = np.repeat(np.arange(n_rows, dtype=np.intp) * width, np.diff(row_ptr))  # (nnz,) intp for np.take
        slot += capped
        small_row, small_count = np.nonzero(summed[:, :SMALL_COUNT])  # row-major: ascending count within row
        small_mult = summed[small_row, small_count] // small_count
        large = np.flatnonzero(counts >= SMALL_COUNT)
        rows_of_large = np.searchsorted(row_ptr, large, side="right") - 1
        large_key = (rows_of_large.astype(np.int64) << 32) | counts[large].astype(np.int64)
        large_keys, large_of, large_mult = np.unique(large_key, return_inverse=True, return_counts=True)
        # merge: a cell's large groups follow its small ones (both lists are sorted by cell, then count)
        n_small, n_large = len(small_row), len(large_keys)
        insert_at = np.searchsorted(small_row, large_keys >> 32, side="right")  # (large groups,)
        large_pos = insert_at + np.arange(n_large)
        shift = np.cumsum(np.bincount(insert_at, minlength=n_small + 1))[:n_small]  # large groups inserted before
        small_pos = np.arange(n_small) + shift
        g_row = np.empty(n_small + n_large, dtype=np.int64)
        g_count = np.empty_like(g_row)
        g_mult = np.empty_like(g_row)
        g_row[small_pos], g_row[large_pos] = small_row, large_keys >> 32
        g_count[small_pos], g_count[large_pos] = small_count, large_keys & 0xFFFFFFFF
        g_mult[small_pos], g_mult[large_pos] = small_mult, large_mult
        return cls(
            row_ptr=row_ptr, g_row=g_row, g_count=g_count, g_end=np.cumsum(g_mult),
            slot=slot, small_group=small_pos, small_slot=small_row * width + small_count,
            large=large, large_group=large_pos[large_of.ravel()],
        )

    def gather(self, per_group: np.ndarray) -> np.ndarray:
        """(nnz,) the value of each entry's group."""
        table = np.zeros((len(self.row_ptr) - 1) * (SMALL_COUNT + 1), dtype=per_group.dtype)
        table[self.small_slot] = per_group[self.small_group]
        out = np.take(table, self.slot)
        out[self.large] = per_group[self.large_group]
        return out

    def bins(self, scale: np.ndarray, n_bins: int, dtype=np.int16) -> np.ndarray:
        """(nnz,) quantile bins of ``log1p(count / scale)``, as :func:`quantile_bins` on sorted values."""
        g_value = np.log1p((self.g_count.astype(np.float32) / scale[self.g_row]).astype(np.float32))
        return self.gather(group_bins(g_value, self.g_row, self.g_end, self.row_ptr, n_bins).astype(dtype))

    def top_k(self, k: int) -> np.ndarray:
        """Bool mask keeping each cell's ``k`` largest counts; among equal counts, the first columns."""
        n = np.diff(self.row_ptr)
        long_rows = np.flatnonzero(n > k)
        first_kept = self.row_ptr[long_rows] + n[long_rows] - k  # (long,) sorted position of the k-th largest
        group = np.searchsorted(self.g_end, first_kept, side="right")  # (long,) the group holding it
        threshold = np.zeros(len(n), dtype=np.int64)  # counts are >= 1: short cells keep everything
        threshold[long_rows] = self.g_count[group]
        row_threshold = threshold[self.g_row]
        code = np.where(self.g_count > row_threshold, 1, np.where(self.g_count == row_threshold, 2, 0)).astype(np.int8)
        entry_code = self.gather(code)  # (nnz,) 1 keep, 2 tie at the threshold count, 0 drop
        keep = entry_code == 1
        ties = np.flatnonzero(entry_code == 2)  # cells contiguous, column order within a cell
        first_tie = np.searchsorted(ties, self.row_ptr[long_rows])  # (long,) each cell's first tie
        need = self.g_end[group] - first_kept  # (long,) ties to keep
        keep[ties[_ranges(first_tie, need)]] = True
        return keep


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each (s, n), without a Python loop."""
    total = int(lengths.sum())
    first = np.cumsum(lengths) - lengths  # (ranges,) where each range starts in the output
    return np.arange(total) + np.repeat(starts - first, lengths)


def count_bins(counts: np.ndarray, row_ptr: np.ndarray, scale: np.ndarray, n_bins: int) -> np.ndarray:
    """Quantile bins of ``log1p(count / scale)`` per row, from integer counts, without sorting entries.

    Parameters
    ----------
    counts
        (nnz,) int32 positive integer counts, rows contiguous (any order within a row).
    row_ptr
        (rows + 1,) int64 start of each row; every row is non-empty.
    scale
        (rows,) float32 ``total / target_sum`` of each cell (scanpy's normalize_total factor).

    Returns
    -------
    (nnz,) int16 bins, identical to :func:`quantile_bins` on the sorted log1p values.
    """
    return CountGroups.build(counts, row_ptr).bins(scale, n_bins)
