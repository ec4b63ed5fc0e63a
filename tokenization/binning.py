"""Per-cell quantile binning (scGPT's), vectorised over cells and exact to the bit.

scGPT bins a cell's non-zero log1p values at the edges ``np.quantile(nonzero, linspace(0, 1, n_bins - 1))``
and gives a value ``x`` a bin drawn at random from ``digitize(x, edges, right=True) + 1 ..
digitize(x, edges)``; the range has more than one bin only when ``x`` equals two or more edges (tied
values). Here the middle of that range is taken, so the result is reproducible and equals scGPT's
wherever scGPT's draw has a single choice.

The work is done on *groups* (distinct values of a cell with their multiplicity), not on entries: a
cell of raw counts has few distinct counts (most are 1, 2, 3, ...), so edges and bins are computed once
per distinct count and gathered back to the entries through a per-cell table (compiled with numba:
one pass over a cell's entries, where array code needs a dozen).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

SMALL_COUNT = 64
"""Counts below this are grouped through a per-cell histogram; larger ones by sorting."""


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
    """The distinct counts of every cell (groups), ascending within each cell, with their multiplicities.

    Built per cell by compiled kernels (numba) without sorting entries: counts below :data:`SMALL_COUNT`
    through a histogram, the rare larger ones by sorting those entries only. The kernels follow
    :func:`quantile_bins` exactly; the tests compare the two.
    """

    row_ptr: np.ndarray  # (rows + 1,) int64 entry range of each cell
    counts: np.ndarray  # (nnz,) int32 non-negative counts, cells contiguous
    g_ptr: np.ndarray  # (rows + 1,) int64 group range of each cell
    g_count: np.ndarray  # (groups,) int64 the distinct count, ascending within a cell
    g_mult: np.ndarray  # (groups,) int64 how many of the cell's entries have it

    @classmethod
    def build(cls, counts: np.ndarray, row_ptr: np.ndarray) -> CountGroups:
        """``counts``: (nnz,) non-negative integer counts, cells contiguous; ``row_ptr``: (rows + 1,) int64."""
        counts = np.ascontiguousarray(counts, dtype=np.int32)
        row_ptr = np.ascontiguousarray(row_ptr, dtype=np.int64)
        g_ptr, g_count, g_mult = _count_groups(row_ptr, counts)
        return cls(row_ptr, counts, g_ptr, g_count, g_mult)

    def values(self, scale: np.ndarray) -> np.ndarray:
        """(groups,) float32 ``log1p(count / scale)`` of each group, with numpy's float32 log1p as scanpy's."""
        g_row = np.repeat(np.arange(len(self.g_ptr) - 1), np.diff(self.g_ptr))  # (groups,)
        return np.log1p((self.g_count.astype(np.float32) / scale[g_row]).astype(np.float32))

    def bins(self, scale: np.ndarray, n_bins: int, dtype=np.int16) -> np.ndarray:
        """(nnz,) quantile bins of ``log1p(count / scale)``, as :func:`quantile_bins` on sorted values."""
        q = np.linspace(0, 1, n_bins - 1)  # (edges,) the quantiles of scGPT's edges
        bins = _entry_bins(self.row_ptr, self.counts, self.g_ptr, self.g_count, self.g_mult, self.values(scale), q)
        return bins.astype(dtype, copy=False)

    def top_k(self, k: int) -> np.ndarray:
        """Bool mask keeping each cell's ``k`` largest counts; among equal counts, the first columns."""
        return _top_k(self.row_ptr, self.counts, self.g_ptr, self.g_count, self.g_mult, k)


def binned_tokens(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, column_ids: np.ndarray, *,
                  target_sum: float, n_bins: int, max_len: int):
    """Binned tokens of CSR count rows in two compiled passes: vocabulary genes only, each cell's ``max_len``
    largest counts (first columns among equal ones), bins as :meth:`CountGroups.bins`.

    ``column_ids`` (genes,) int32 maps columns to token ids (-1: not in the vocabulary; no id twice). Returns ``(kept_rows, offsets, gene_ids,
    bins)``: the rows with counts on vocabulary genes, (kept + 1,) int64 token offsets, (tokens,) int32 ids
    and (tokens,) float32 bins, in column order within a cell.
    """
    row_ptr, gene_ids, counts, totals, kept_rows, g_ptr, g_count, g_mult = _vocabulary_entries(
        indptr.astype(np.int64, copy=False), indices, data, column_ids)
    groups = CountGroups(row_ptr, counts, g_ptr, g_count, g_mult)
    scale = (totals / np.float32(target_sum)).astype(np.float32)  # (kept,) scanpy's normalize_total factor
    q = np.linspace(0, 1, n_bins - 1)
    offsets, out_ids, out_bins = _binned_top(row_ptr, gene_ids, counts, g_ptr, g_count, g_mult, groups.values(scale),
                                             q, max_len)
    return kept_rows, offsets, out_ids, out_bins


# ------------------------------------------------------------------------------------ compiled kernels
# One pass over a cell's entries each, where array code needs a dozen; the per-cell helpers are shared.
@numba.njit(cache=True, nogil=True)
def _row_groups(counts, lo, hi, hist, large, g_count, g_mult, g):  # pragma: no cover - compiled
    """Append the distinct counts of ``counts[lo:hi]`` (ascending, with multiplicities) at group ``g``."""
    n_large = 0
    for i in range(lo, hi):
        c = counts[i]
        if c < SMALL_COUNT:
            hist[c] += 1
        else:
            large[n_large] = c
            n_large += 1
    return _emit_groups(hist, large, n_large, g_count, g_mult, g)


@numba.njit(cache=True, nogil=True)
def _emit_groups(hist, large, n_large, g_count, g_mult, g):  # pragma: no cover - compiled
    """Write a cell's groups from its small-count histogram (cleared) and its ``n_large`` larger counts."""
    for c in range(SMALL_COUNT):
        if hist[c]:
            g_count[g] = c
            g_mult[g] = hist[c]
            hist[c] = 0
            g += 1
    if n_large:
        big = np.sort(large[:n_large])
        start = 0
        for j in range(1, n_large + 1):
            if j == n_large or big[j] != big[start]:
                g_count[g] = big[start]
                g_mult[g] = j - start
                g += 1
                start = j
    return g


@numba.njit(cache=True, nogil=True)
def _row_edges(n, g0, g_mult, g_value, q, edges):  # pragma: no cover - compiled
    """``edges[:] = np.quantile(sorted values, q)`` for a cell of ``n`` entries in groups from ``g0``:
    numpy's 'linear' method and two-sided lerp, to the bit."""
    last = n - 1  # sorted positions run 0..last
    lower = upper = g0
    lower_end = upper_end = g_mult[g0]  # sorted position just past group `lower` / `upper`
    for j in range(len(q)):
        virtual = last * q[j]
        prev = np.floor(virtual)
        gamma = virtual - prev
        p = last if virtual >= last else np.int64(prev)
        nxt = last if virtual >= last else p + 1
        while lower_end <= p:
            lower += 1
            lower_end += g_mult[lower]
        while upper_end <= nxt:
            upper += 1
            upper_end += g_mult[upper]
        a, b = g_value[lower], g_value[upper]
        diff = np.float64(b - a)  # a float32 subtraction, as numpy's lerp on float32 values
        if gamma >= 0.5:
            edges[j] = np.float64(b) - diff * (1 - gamma)
        else:
            edges[j] = np.float64(a) + diff * gamma


@numba.njit(cache=True, nogil=True)
def _row_bins(g0, g1, g_count, g_value, edges, group_bin, small_bin):  # pragma: no cover - compiled
    """Bin of each group of a cell, the middle of scGPT's range; also by count in ``small_bin``."""
    for t in range(g0, g1):
        x = np.float64(g_value[t])
        left = 0  # edges <= x
        right = 0  # edges < x; scGPT draws the bin from right + 1 .. left
        for e in edges:
            left += e <= x
            right += e < x
        group_bin[t] = right + (left - right + 1) // 2
        if g_count[t] < SMALL_COUNT:
            small_bin[g_count[t]] = group_bin[t]


@numba.njit(cache=True, nogil=True)
def _row_threshold(g0, g1, g_count, g_mult, k):  # pragma: no cover - compiled
    """The smallest count among a cell's ``k`` largest, and how many entries with it are kept."""
    above, t = 0, g1 - 1  # entries with counts above group t's
    while above + g_mult[t] < k:
        above += g_mult[t]
        t -= 1
    return g_count[t], k - above


@numba.njit(cache=True, nogil=True)
def _count_groups(row_ptr, counts):  # pragma: no cover - compiled
    n_rows = len(row_ptr) - 1
    g_ptr = np.zeros(n_rows + 1, np.int64)
    g_count = np.empty(len(counts), np.int64)  # at most one group per entry
    g_mult = np.empty(len(counts), np.int64)
    hist = np.zeros(SMALL_COUNT, np.int64)
    large = np.empty(np.max(np.diff(row_ptr)) if n_rows else 0, np.int64)
    for r in range(n_rows):
        g_ptr[r + 1] = _row_groups(counts, row_ptr[r], row_ptr[r + 1], hist, large, g_count, g_mult, g_ptr[r])
    g = g_ptr[n_rows]
    return g_ptr, g_count[:g].copy(), g_mult[:g].copy()


@numba.njit(cache=True, nogil=True)
def _entry_bins(row_ptr, counts, g_ptr, g_count, g_mult, g_value, q):  # pragma: no cover - compiled
    out = np.empty(len(counts), np.int16)
    edges = np.empty(len(q), np.float64)
    group_bin = np.empty(len(g_count), np.int16)
    small_bin = np.zeros(SMALL_COUNT, np.int16)
    for r in range(len(row_ptr) - 1):
        g0, g1 = g_ptr[r], g_ptr[r + 1]
        _row_edges(row_ptr[r + 1] - row_ptr[r], g0, g_mult, g_value, q, edges)
        _row_bins(g0, g1, g_count, g_value, edges, group_bin, small_bin)
        for i in range(row_ptr[r], row_ptr[r + 1]):
            c = counts[i]  # (a helper function here costs 10x: numba does not inline it well)
            out[i] = small_bin[c] if c < SMALL_COUNT else group_bin[g0 + np.searchsorted(g_count[g0:g1], c)]
    return out


@numba.njit(cache=True, nogil=True)
def _top_k(row_ptr, counts, g_ptr, g_count, g_mult, k):  # pragma: no cover - compiled
    keep = np.ones(len(counts), np.bool_)
    for r in range(len(row_ptr) - 1):
        if row_ptr[r + 1] - row_ptr[r] <= k:
            continue
        threshold, ties = _row_threshold(g_ptr[r], g_ptr[r + 1], g_count, g_mult, k)
        for i in range(row_ptr[r], row_ptr[r + 1]):
            if counts[i] == threshold and ties > 0:
                ties -= 1
            elif counts[i] <= threshold:
                keep[i] = False
    return keep


@numba.njit(cache=True, nogil=True)
def _vocabulary_entries(indptr, indices, data, column_ids):  # pragma: no cover - compiled
    """Entries on vocabulary genes with non-zero counts, empty cells dropped, and their count groups."""
    n_rows = len(indptr) - 1
    nnz = len(data)
    row_ptr = np.zeros(n_rows + 1, np.int64)
    gene_ids = np.empty(nnz, np.int32)
    counts = np.empty(nnz, np.int32)
    totals = np.empty(n_rows, np.float32)
    kept_rows = np.empty(n_rows, np.int64)
    g_ptr = np.zeros(n_rows + 1, np.int64)
    g_count = np.empty(nnz, np.int64)
    g_mult = np.empty(nnz, np.int64)
    hist = np.zeros(SMALL_COUNT, np.int64)
    large = np.empty(np.max(np.diff(indptr)) if n_rows else 0, np.int64)
    kept = 0
    pos = 0
    for r in range(n_rows):
        start = pos
        n_large = 0
        total = 0.0  # library size over all genes, vocabulary or not
        for i in range(indptr[r], indptr[r + 1]):
            x = data[i]
            total += x
            if x == 0:
                continue
            column = indices[i]
            if column_ids[column] >= 0:
                c = np.int32(np.rint(x))
                gene_ids[pos] = column_ids[column]
                counts[pos] = c
                pos += 1
                if c < SMALL_COUNT:  # the cell's count groups, counted in the same pass
                    hist[c] += 1
                else:
                    large[n_large] = c
                    n_large += 1
        if pos == start:  # no counts on vocabulary genes: dropped (and counted by the caller)
            continue
        totals[kept] = total
        kept_rows[kept] = r
        row_ptr[kept + 1] = pos
        g_ptr[kept + 1] = _emit_groups(hist, large, n_large, g_count, g_mult, g_ptr[kept])
        kept += 1
    g = g_ptr[kept]
    return (row_ptr[:kept + 1].copy(), gene_ids[:pos].copy(), counts[:pos].copy(), totals[:kept].copy(),
            kept_rows[:kept].copy(), g_ptr[:kept + 1].copy(), g_count[:g].copy(), g_mult[:g].copy())


@numba.njit(cache=True, nogil=True)
def _binned_top(row_ptr, gene_ids, counts, g_ptr, g_count, g_mult, g_value, q, k):  # pragma: no cover - compiled
    """Each cell's ``k`` largest counts in column order, as (offsets, gene ids, float32 bins)."""
    n_rows = len(row_ptr) - 1
    offsets = np.zeros(n_rows + 1, np.int64)
    for r in range(n_rows):
        offsets[r + 1] = offsets[r] + min(row_ptr[r + 1] - row_ptr[r], k)
    out_ids = np.empty(offsets[n_rows], np.int32)
    out_bins = np.empty(offsets[n_rows], np.float32)
    edges = np.empty(len(q), np.float64)
    group_bin = np.empty(len(g_count), np.int16)
    small_bin = np.zeros(SMALL_COUNT, np.int16)
    for r in range(n_rows):
        lo, hi, g0, g1 = row_ptr[r], row_ptr[r + 1], g_ptr[r], g_ptr[r + 1]
        _row_edges(hi - lo, g0, g_mult, g_value, q, edges)
        _row_bins(g0, g1, g_count, g_value, edges, group_bin, small_bin)
        threshold, ties = (-1, 0) if hi - lo <= k else _row_threshold(g0, g1, g_count, g_mult, k)
        o = offsets[r]
        for i in range(lo, hi):
            c = counts[i]
            if c == threshold and ties > 0:
                ties -= 1
            elif c <= threshold:
                continue
            out_ids[o] = gene_ids[i]
            out_bins[o] = small_bin[c] if c < SMALL_COUNT else group_bin[g0 + np.searchsorted(g_count[g0:g1], c)]
            o += 1
    return offsets, out_ids, out_bins


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
