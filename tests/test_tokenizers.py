"""The three tokenizers: binning exactness and properties, rank order and medians, continuous values,
selection, determinism across runs and chunkings, bad input, persistence."""

import numpy as np
import pytest
import scipy.sparse as sp

from atlasformer.tokenization import (
    CellTokenizer,
    GeneVocab,
    TokenizerConfig,
    build_vocab,
    gene_keys,
    gene_nonzero_medians,
    read_h5ad,
    tokenize_anndata,
)
from atlasformer.tokenization.binning import count_bins, quantile_bins


def vocab_for(n_genes):
    return GeneVocab([f"g{i:05d}" for i in range(n_genes)])


def encode(counts, kind="binned", **kw):
    counts = sp.csr_matrix(counts, dtype=np.float32)
    tokenizer = CellTokenizer(vocab_for(counts.shape[1]), TokenizerConfig(kind=kind, **kw))
    return tokenizer.encode(counts, np.arange(counts.shape[1]) + 3)


def scgpt_range(row, n_bins):
    """scGPT's possible bins for a cell's non-zero values: digitize right+1 .. left (one value if untied)."""
    edges = np.quantile(row, np.linspace(0, 1, n_bins - 1))
    left, right = np.digitize(row, edges), np.digitize(row, edges, right=True)
    return np.where(left == right, left, right + 1), left


@pytest.fixture(scope="module")
def counts():
    rng = np.random.default_rng(0)
    x = rng.negative_binomial(1, rng.uniform(0.3, 0.95, size=(1, 400)), size=(120, 400)).astype(np.float32)
    x[:, :5] *= 40  # a few large counts, above the histogram's small-count range
    x[7] = 0  # an empty cell
    return x


# ------------------------------------------------------------------------------------ binning
def test_quantile_bins_equal_numpy_on_untied_rows():
    rng = np.random.default_rng(1)
    rows = [rng.random(rng.integers(2, 300)).astype(np.float32) for _ in range(200)]
    values = np.concatenate([np.sort(r) for r in rows])
    ptr = np.r_[0, np.cumsum([len(r) for r in rows])]
    for n_bins in (3, 11, 51):
        bins = quantile_bins(values, ptr, n_bins)
        for i, row in enumerate(rows):
            row = np.sort(row)
            assert np.array_equal(bins[ptr[i]:ptr[i + 1]], np.digitize(row, np.quantile(row, np.linspace(0, 1, n_bins - 1))))


def test_count_bins_equal_quantile_bins_and_stay_in_scgpts_range(counts):
    x = counts[counts.sum(1) > 0]
    csr = sp.csr_matrix(x)
    ptr = csr.indptr.astype(np.int64)
    rows = np.repeat(np.arange(x.shape[0], dtype=np.int32), np.diff(ptr))
    totals = x.sum(1).astype(np.float32)
    scale = (totals / np.float32(1e4)).astype(np.float32)
    logv = np.log1p((csr.data / scale[rows]).astype(np.float32))
    bins = count_bins(csr.data.astype(np.int32), ptr, scale, 51)
    order = np.lexsort((logv, rows))
    by_sort = np.empty(len(order), dtype=np.int64)
    by_sort[order] = quantile_bins(logv[order], ptr, 51)
    assert np.array_equal(bins, by_sort)
    for i in range(x.shape[0]):
        low, high = scgpt_range(logv[ptr[i]:ptr[i + 1]], 51)
        assert np.all((bins[ptr[i]:ptr[i + 1]] >= low) & (bins[ptr[i]:ptr[i + 1]] <= high))


@pytest.mark.parametrize("max_seq_len", [10_000, 37, 5])
def test_compiled_binned_path_equals_the_array_path(counts, max_seq_len, monkeypatch):
    """The compiled binned/top path gives the same tokens as the general array code, including unknown
    genes, explicit zeros, empty cells, ties at the top-k threshold and counts above the histogram."""
    x = counts.copy()
    x[3, 10:20] = 7  # ties at the threshold
    csr = sp.csr_matrix(x)
    csr.data[::17] = 0  # explicit zeros are not expressed
    column_ids = np.arange(x.shape[1]) + 3
    column_ids[::11] = -1  # genes outside the vocabulary
    tokenizer = CellTokenizer(vocab_for(x.shape[1]), TokenizerConfig(max_seq_len=max_seq_len))
    assert tokenizer._compiled_path(column_ids)
    fast = tokenizer.encode(csr, column_ids)
    monkeypatch.setattr(CellTokenizer, "_compiled_path", lambda self, ids: False)
    slow = tokenizer.encode(csr, column_ids)
    for name in ("offsets", "gene_ids", "values", "cell_index"):
        assert np.array_equal(getattr(fast, name), getattr(slow, name)), name
    assert fast.values.dtype == slow.values.dtype == np.float32
    assert fast.n_empty_dropped == slow.n_empty_dropped == 1


def test_binning_properties(counts):
    cells = encode(counts, max_seq_len=10_000)
    assert cells.n_empty_dropped == 1 and len(cells) == counts.shape[0] - 1
    assert 7 not in cells.cell_index
    for i, row in enumerate(cells.cell_index):
        genes, bins = cells.cell(i)
        raw = counts[row, genes - 3]
        assert np.all(raw > 0)  # zeros are never tokens
        assert bins.min() >= 1 and bins.max() <= 50
        order = np.argsort(raw, kind="stable")
        assert np.all(np.diff(bins[order]) >= 0)  # monotone in the count within a cell
        assert len(genes) == np.count_nonzero(counts[row])


@pytest.mark.parametrize("selection", ["subsample", "top"])
def test_identical_across_runs_and_chunkings(sim_adata, sim_h5ad, selection):
    tokenizer = CellTokenizer(build_vocab([sim_adata]), TokenizerConfig(max_seq_len=50, selection=selection))
    whole = tokenize_anndata(sim_adata, tokenizer).cells  # in memory: one pass over the matrix
    again = tokenize_anndata(sim_adata, tokenizer).cells
    backed = read_h5ad(sim_h5ad)
    chunked = tokenize_anndata(backed, tokenizer, chunk_size=7).cells  # read 7 cells at a time
    for other in (again, chunked):
        assert np.array_equal(whole.offsets, other.offsets)
        assert np.array_equal(whole.gene_ids, other.gene_ids) and np.array_equal(whole.values, other.values)


def test_equal_to_numpy_quantiles_on_a_real_file(shared_data):
    adata = read_h5ad(shared_data("pbmc1k_cite.rna.h5ad"), backed=False)
    tokenizer = CellTokenizer(build_vocab([adata]), TokenizerConfig(max_seq_len=10_000))
    data = tokenize_anndata(adata, tokenizer)
    column_of = dict(zip(tokenizer.column_ids(gene_keys(adata)), range(adata.n_vars)))
    x = adata.X.tocsr()
    for i in range(0, len(data.cells), 25):
        row = data.cells.cell_index[i]
        genes, bins = data.cells.cell(i)
        raw = x[row].toarray().ravel()
        scale = np.float32(raw.sum()) / np.float32(1e4)
        logv = np.log1p((raw[[column_of[g] for g in genes]] / scale).astype(np.float32))
        low, high = scgpt_range(logv, 51)
        untied = low == high
        assert np.array_equal(bins[untied], high[untied])  # scGPT's bin wherever its choice is unique
        assert np.all((bins >= low) & (bins <= high))


# ------------------------------------------------------------------------------------ continuous
def test_continuous_values_are_log1p_of_normalised_counts(counts):
    cells = encode(counts, kind="continuous", max_seq_len=10_000)
    for i, row in enumerate(cells.cell_index[:20]):
        genes, values = cells.cell(i)
        total = counts[row].sum()
        expected = np.log1p(counts[row, genes - 3] / total * 1e4)
        assert np.allclose(values, expected, rtol=1e-6)


# ------------------------------------------------------------------------------------ selection
def test_subsample_keeps_exactly_max_seq_len_and_depends_on_seed(counts):
    a = encode(counts, max_seq_len=30, selection="subsample", seed=0)
    b = encode(counts, max_seq_len=30, selection="subsample", seed=1)
    full = encode(counts, max_seq_len=10_000)
    assert np.all(a.lengths == np.minimum(full.lengths, 30))
    assert not np.array_equal(a.gene_ids, b.gene_ids)
    for i in range(len(a)):
        kept, kept_bins = a.cell(i)
        all_genes, all_bins = full.cell(i)
        assert set(kept) <= set(all_genes)
        assert np.array_equal(kept_bins, all_bins[np.isin(all_genes, kept)])  # binned over the whole cell
        assert np.all(np.diff(np.searchsorted(all_genes, kept)) > 0)  # column order kept


def test_top_selection_keeps_the_largest_counts(counts):
    cells = encode(counts, max_seq_len=30, selection="top")
    for i, row in enumerate(cells.cell_index):
        genes, _ = cells.cell(i)
        kept = counts[row, genes - 3]
        dropped = np.delete(counts[row], genes - 3)
        assert kept.min() >= dropped.max()
        ties = np.flatnonzero(counts[row] == kept.min())  # at the threshold count: the first columns are kept
        assert np.array_equal(np.isin(ties, genes - 3), np.arange(len(ties)) < np.isin(ties, genes - 3).sum())


# ------------------------------------------------------------------------------------ rank
def rank_reference(x, medians, k):
    """Geneformer's rule, one cell at a time: counts / total x 1e4 / median (float64), descending, first k.

    Exactly equal values keep column order.
    """
    out = []
    for row in x.astype(np.float64):
        nz = np.flatnonzero(row)
        ratio = row[nz] / row.sum() * 1e4 / medians[nz]
        out.append(nz[np.argsort(-ratio, kind="stable")][:k])
    return out


def test_rank_order_and_medians(sim_adata):
    vocab = build_vocab([sim_adata])
    exact = gene_nonzero_medians([sim_adata], vocab=vocab, method="exact")
    approx = gene_nonzero_medians([sim_adata], vocab=vocab, chunk_size=50)
    assert exact.keys() == approx.keys()
    assert max(abs(approx[g] / exact[g] - 1) for g in exact) < 0.016  # documented bound: one bin ratio
    x = sim_adata.X.toarray()
    column = 2
    nonzero = x[:, column][x[:, column] > 0] / x[x[:, column] > 0].sum(1) * 1e4
    assert exact[sim_adata.var_names[column]] == pytest.approx(np.median(nonzero), rel=1e-6)

    tokenizer = CellTokenizer(vocab, TokenizerConfig(kind="rank", max_seq_len=40), gene_medians=exact)
    cells = tokenize_anndata(sim_adata, tokenizer).cells
    medians = np.array([exact[g] for g in sim_adata.var_names])
    expected = rank_reference(x, medians, 40)
    ids = vocab.lookup(sim_adata.var_names)
    for i in range(len(cells)):
        genes, values = cells.cell(i)
        assert np.array_equal(genes, ids[expected[i]])
        ratio = values / medians[expected[i]]
        assert np.all(np.diff(ratio) <= 1e-6 * ratio[:-1])  # descending normalised expression / median


def test_medians_do_not_depend_on_chunking_or_order(sim_adata):
    half = sim_adata.n_obs // 2
    a, b = sim_adata[:half].copy(), sim_adata[half:].copy()
    whole = gene_nonzero_medians([sim_adata])
    assert gene_nonzero_medians([b, a], chunk_size=64) == whole


def test_save_and_load_round_trip(tmp_path, sim_adata):
    vocab = build_vocab([sim_adata])
    medians = gene_nonzero_medians([sim_adata], vocab=vocab)
    tokenizer = CellTokenizer(vocab, TokenizerConfig(kind="rank", max_seq_len=64), gene_medians=medians)
    tokenizer.save(tmp_path)
    assert (tmp_path / "gene_medians.json").exists()
    loaded = CellTokenizer.load(tmp_path)
    assert loaded.config == tokenizer.config and loaded.gene_medians == pytest.approx(medians)
    a = tokenize_anndata(sim_adata, tokenizer).cells
    b = tokenize_anndata(sim_adata, loaded).cells
    assert np.array_equal(a.gene_ids, b.gene_ids)


def test_rank_needs_medians(sim_adata):
    with pytest.raises(Exception, match="needs gene medians"):
        CellTokenizer(build_vocab([sim_adata]), TokenizerConfig(kind="rank"))


def test_unknown_columns_and_explicit_zeros_are_skipped(counts):
    x = sp.csr_matrix(counts)
    x.data[::7] = 0  # explicit zeros stay in the matrix
    column_ids = np.arange(x.shape[1]) + 3
    column_ids[::3] = -1  # genes outside the vocabulary
    tokenizer = CellTokenizer(vocab_for(x.shape[1]), TokenizerConfig(kind="continuous", max_seq_len=10_000))
    cells = tokenizer.encode(x, column_ids)
    dense = x.toarray()
    for i, row in enumerate(cells.cell_index):
        genes, values = cells.cell(i)
        expected = np.flatnonzero((dense[row] > 0) & (column_ids >= 0))
        assert np.array_equal(genes, column_ids[expected])
        assert np.allclose(values, np.log1p(dense[row, expected] / dense[row].sum() * 1e4), rtol=1e-6)


def test_radix_select_keeps_the_k_smallest_scores_first_position_on_ties():
    from atlasformer.tokenization.tokenizer import smallest_in_rows

    rng = np.random.default_rng(3)
    lengths = rng.integers(11, 300, size=40)
    ptr = np.concatenate([[0], np.cumsum(lengths)])
    for high in (2**32, 5):  # distinct scores, then heavy ties
        score = rng.integers(0, high, size=ptr[-1], dtype=np.uint64).astype(np.uint32)
        keep = smallest_in_rows(ptr, score, 10)
        for lo, hi in zip(ptr[:-1], ptr[1:]):
            expected = np.zeros(hi - lo, dtype=bool)
            expected[np.argsort(score[lo:hi], kind="stable")[:10]] = True
            assert np.array_equal(keep[lo:hi], expected)


def test_rank_order_is_exact_where_float32_would_tie():
    vocab = vocab_for(3)
    genes = vocab.genes
    medians = {genes[0]: 1.0 + 1e-9, genes[1]: 1.0, genes[2]: 1.0 + 1e-9}  # equal in float32, not in float64
    tokenizer = CellTokenizer(vocab, TokenizerConfig(kind="rank", max_seq_len=3), gene_medians=medians)
    cells = tokenizer.encode(sp.csr_matrix(np.array([[2.0, 2.0, 2.0]], dtype=np.float32)), vocab.lookup(genes))
    assert list(cells.cell(0)[0]) == list(vocab.lookup([genes[1], genes[0], genes[2]]))  # exact ties: column order


@pytest.mark.parametrize("kind", ["binned", "rank"])
def test_blocks_of_a_large_matrix_match_row_by_row(kind):
    rng = np.random.default_rng(5)
    x = sp.random(2600, 80, density=0.3, random_state=rng, data_rvs=lambda n: rng.integers(1, 90, n)).tocsr()
    vocab = vocab_for(80)
    medians = {g: float(m) for g, m in zip(vocab.genes, rng.uniform(0.5, 5, 80))} if kind == "rank" else None
    tokenizer = CellTokenizer(vocab, TokenizerConfig(kind=kind, max_seq_len=15, selection="subsample"), gene_medians=medians)
    ids = np.arange(80) + 3
    whole = tokenizer.encode(x, ids)  # more rows than one internal block
    parts = [tokenizer.encode(x[lo:lo + 300], ids, cell_index=np.arange(lo, min(lo + 300, 2600))) for lo in range(0, 2600, 300)]
    for a, b in zip((whole.offsets, whole.gene_ids, whole.values, whole.cell_index),
                    (np.concatenate([[0], np.cumsum(np.concatenate([p.lengths for p in parts]))]),
                     np.concatenate([p.gene_ids for p in parts]), np.concatenate([p.values for p in parts]),
                     np.concatenate([p.cell_index for p in parts]))):
        assert np.array_equal(a, b)
