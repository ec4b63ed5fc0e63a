"""Gene identifiers: routes to canonical keys, the ambiguity rules, user tables, reports, real files."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from atlasformer.tokenization import (
    CellTokenizer,
    InputError,
    TokenizerConfig,
    build_vocab,
    read_h5ad,
    resolve_gene_ids,
    tokenize_anndata,
)
from atlasformer.tokenization.gene_ids import build_gene_table, resolve_names

A1BG, A2M, CD8A, DDT, MRE11, TP53 = (
    "ENSG00000121410", "ENSG00000175899", "ENSG00000153563", "ENSG00000099977", "ENSG00000020922", "ENSG00000141510",
)


def make(names, counts=None, var=None):
    n = len(names)
    x = np.ones((3, n), dtype=np.float32) if counts is None else np.asarray(counts, dtype=np.float32)
    var = pd.DataFrame(var or {}, index=names)
    return ad.AnnData(X=sp.csr_matrix(x), obs=pd.DataFrame(index=[f"c{i}" for i in range(x.shape[0])]), var=var)


def resolve(names, **kw):
    return resolve_gene_ids(pd.DataFrame(index=names), **kw)


def test_each_route_and_the_report_counts():
    names = [A1BG, f"{A2M}.14", "TP53", "MRE11A", "Cd8a", "SIM00001", "0"]
    res = resolve(names, source="mixed.h5ad")
    assert list(res.keys) == [A1BG, A2M, TP53, MRE11, CD8A, "SIM00001", None]
    assert list(res.routes) == ["ensembl", "ensembl_versioned", "symbol", "alias", "uppercase", "unresolved", "dropped"]
    report = res.report
    assert report.routes == {"ensembl": 1, "ensembl_versioned": 1, "symbol": 1, "alias": 1, "uppercase": 1,
                             "unresolved": 1, "dropped": 1}
    assert report.n_resolved == 5 and report.not_identifiers == ["0"]
    res.set_expressed(np.array([True, True, True, True, False, True, False]))
    assert report.n_expressed == 5 and report.resolved_fraction == pytest.approx(4 / 5)
    assert "mixed.h5ad: 5/7 genes resolved" in report.summary()


def test_unknown_ensembl_id_keeps_its_name_without_version():
    res = resolve(["ENSG00000999999.3", "RP11-34P13.3"])
    assert list(res.keys) == ["ENSG00000999999", "RP11-34P13.3"]
    assert list(res.routes) == ["unresolved", "unresolved"]


def test_ambiguous_alias_is_not_used_and_official_symbol_wins():
    # APITD1 is an alias of CENPS and of CENPS-CORT; DDT is DDT's symbol and DDTL's alias
    res = resolve(["APITD1", "DDT"])
    assert list(res.keys) == ["APITD1", DDT]
    assert list(res.routes) == ["unresolved", "symbol"]
    assert res.report.ambiguous == ["APITD1"]


def test_ambiguity_rules_on_a_small_table():
    table = build_gene_table(pd.DataFrame({
        "ensembl_id": ["E1", "E2", "E3", ""],
        "symbol": ["AAA", "BBB", "CCC", "CCC"],
        "aliases": ["X1|BBB|OLD", "X1", "", ""],
    }), "toy")
    res = resolve_names([pd.Series(["X1", "BBB", "OLD", "CCC", "old"])], (table,))
    # X1 names two genes: ambiguous; BBB is an official symbol (beats AAA's alias); CCC: the record with an ID
    assert list(res.keys) == ["X1", "E2", "E1", "E3", "E1"]
    assert list(res.routes) == ["unresolved", "symbol", "alias", "symbol", "uppercase"]


def test_ensembl_column_beats_symbols_and_fills_gaps():
    # var_names are symbols, the gene_ids column holds Ensembl IDs (10x style): the Ensembl route wins
    res = resolve_gene_ids(pd.DataFrame({"gene_ids": [A1BG, "unknown"]}, index=["A1BG", "TP53"]))
    assert list(res.keys) == [A1BG, TP53]
    assert list(res.routes) == ["ensembl", "symbol"]


def test_gene_key_restricts_to_one_column():
    var = pd.DataFrame({"gene_symbol": ["TP53", "CD8A"]}, index=["x", "y"])
    assert list(resolve_gene_ids(var, gene_key="gene_symbol").keys) == [TP53, CD8A]
    with pytest.raises(InputError, match="gene_key='nope' is not a var column"):
        resolve_gene_ids(var, gene_key="nope")


def test_user_table_for_mouse_and_ortholog_table(tmp_path):
    mouse = tmp_path / "mouse.tsv"
    mouse.write_text("ensembl_id\tsymbol\taliases\nENSMUSG00000053977\tCd8a\tLy-2\n")
    res = resolve(["ENSMUSG00000053977.9", "Ly-2", "TP53"], gene_table=mouse)
    assert list(res.keys) == ["ENSMUSG00000053977", "ENSMUSG00000053977", TP53]  # human table still consulted
    assert list(res.routes) == ["ensembl_versioned", "alias", "symbol"]
    orthologs = tmp_path / "orthologs.tsv"
    orthologs.write_text(f"ensembl_id\tsymbol\tkey\nENSMUSG00000053977\tCd8a\t{CD8A}\n")
    res = resolve(["ENSMUSG00000053977", "Cd8a"], gene_table=orthologs)
    assert list(res.keys) == [CD8A, CD8A] and list(res.routes) == ["ensembl", "symbol"]
    with pytest.raises(InputError, match="gene table not found"):
        resolve(["TP53"], gene_table=tmp_path / "missing.tsv")


def test_symbols_and_ensembl_ids_share_tokens():
    by_symbol = make(["A1BG", "A2M", "TP53"], counts=[[1, 2, 3]])
    by_ensembl = make([A1BG, f"{A2M}.3", TP53], counts=[[1, 2, 3]])
    vocab = build_vocab([by_symbol, by_ensembl])
    assert vocab.genes == sorted([A1BG, A2M, TP53])
    tokenizer = CellTokenizer(vocab, TokenizerConfig(kind="continuous"))
    a = tokenize_anndata(by_symbol, tokenizer).cells
    b = tokenize_anndata(by_ensembl, tokenizer).cells
    assert np.array_equal(a.gene_ids, b.gene_ids) and np.array_equal(a.values, b.values)


def test_two_names_of_one_gene_are_summed():
    adata = make(["MRE11", "MRE11A", "TP53"], counts=[[2, 3, 1], [0, 4, 1]])
    data = tokenize_anndata(adata, CellTokenizer(build_vocab([adata]), TokenizerConfig(kind="continuous")))
    vocab = build_vocab([adata])
    assert vocab.genes == sorted([MRE11, TP53])
    genes, values = data.cells.cell(0)
    assert sorted(genes.tolist()) == sorted(vocab.lookup([MRE11, TP53]).tolist())
    mre11 = values[genes == vocab.lookup([MRE11])[0]][0]
    assert mre11 == pytest.approx(np.log1p(5 / 6 * 1e4), rel=1e-6)  # 2 + 3 counts of 6
    assert data.report.gene_ids.merged == ["MRE11A"]


def test_raw_mode_keeps_names():
    adata = make(["TP53", f"{A1BG}.2"])
    vocab = build_vocab([adata], gene_id_mode="raw")
    assert vocab.genes == sorted(["TP53", f"{A1BG}.2"])
    tokenizer = CellTokenizer(vocab, TokenizerConfig(gene_id_mode="raw"))
    assert tokenize_anndata(adata, tokenizer).report.gene_ids.routes == {"raw": 2}


def test_simulated_names_fall_through(sim_adata):
    vocab = build_vocab([sim_adata])
    assert vocab.genes == list(sim_adata.var_names)  # SIM00001... kept as given
    data = tokenize_anndata(sim_adata, CellTokenizer(vocab))
    assert data.report.gene_ids.routes["unresolved"] == sim_adata.n_vars
    assert data.report.overlap == 1.0


def test_row_number_names_give_a_no_overlap_error():
    adata = make([str(i) for i in range(5)])
    with pytest.raises(InputError, match=r"lost.h5ad: no overlap with any gene vocabulary.*row numbers"):
        build_vocab([adata], sources=["lost.h5ad"])
    vocab = build_vocab([make(["TP53", "CD8A"])])
    with pytest.raises(InputError, match=r"lost.h5ad: no overlap"):
        tokenize_anndata(adata, CellTokenizer(vocab), source="lost.h5ad")


# ------------------------------------------------------------------------------------ real files
def test_real_files_resolve_by_their_routes(shared_data):
    kang = read_h5ad(shared_data("kang_pbmc_8donors.h5ad"))
    routes = resolve_gene_ids(kang.var, source="kang").report.routes
    assert routes["ensembl"] > 1200 and routes["symbol"] > 0 and routes["unresolved"] == 0  # gene_symbol fills gaps
    cite = read_h5ad(shared_data("pbmc1k_cite.rna.h5ad"))
    cite_res = resolve_gene_ids(cite.var, source="cite")
    assert cite_res.report.routes["ensembl"] > 600  # var['gene_ids'] beats the symbol var_names
    shared = set(resolve_gene_ids(kang.var).keys) & set(cite_res.keys)
    assert len(shared) > 100  # Ensembl-named and symbol-named files share tokens


def test_mouse_fallback_reports_its_overlap(shared_data):
    mouse = read_h5ad(shared_data("scicar_mouse_kidney.rna.h5ad"))
    tokenizer = CellTokenizer(build_vocab([mouse], sources=["scicar"]))
    report = tokenize_anndata(mouse, tokenizer, source="scicar").report.gene_ids
    assert report.species == "mouse"
    assert report.routes["uppercase"] > 900  # gene_short_name, upper-cased, matched to human symbols
    assert 0.5 < report.resolved_fraction < 1.0
    assert "of expressed genes resolved" in report.summary()


def test_a_file_that_lost_its_gene_names():
    """var_names that are row numbers ('0', '1', ...) share no token with any vocabulary: a clear error naming the
    file and the fix (the public baron and eccite files had this until their names were restored)."""
    adata = ad.AnnData(sp.csr_matrix(np.ones((4, 30), dtype=np.float32)))
    adata.var_names = [str(i) for i in range(30)]
    with pytest.raises(InputError, match=r"lost.h5ad: no overlap with any gene vocabulary.*row numbers.*gene_key"):
        build_vocab([adata], sources=["lost.h5ad"])


@pytest.mark.parametrize("name", ["baron_mouse_pancreas.h5ad", "eccite_pbmc_500.rna.h5ad"])
def test_restored_gene_names_resolve(shared_data, name):
    adata = read_h5ad(shared_data(name))
    vocab = build_vocab([adata], sources=[name])
    assert len(vocab) - 3 > 0.5 * adata.n_vars  # most of the restored symbols resolve


def test_vocabulary_keeps_genes_seen_in_enough_cells():
    """Pretraining's vocabulary leaves out genes (almost) no corpus cell counts: their embeddings never train."""
    x = np.zeros((10, 4), dtype=np.float32)
    x[:, 0] = 1  # all cells
    x[:3, 1] = 2  # three cells
    x[0, 2] = 5  # one cell; gene 3 never
    adata = ad.AnnData(sp.csr_matrix(x), var=pd.DataFrame(index=["A1", "A2", "A3", "A4"]))
    genes = lambda v: [g for g in v.genes if not g.startswith("<")]  # noqa: E731
    assert genes(build_vocab([adata], gene_id_mode="raw")) == ["A1", "A2", "A3", "A4"]
    assert genes(build_vocab([adata], gene_id_mode="raw", min_cells=1)) == ["A1", "A2", "A3"]
    assert genes(build_vocab([adata, adata], gene_id_mode="raw", min_cells=5)) == ["A1", "A2"]  # counted over files


def test_vocabulary_of_tokens_keeps_genes_that_are_ever_a_token():
    """Genes expressed but never among a cell's kept (most expressed) genes never train; the cut drops them and
    changes no cell's tokens."""
    from atlasformer.tokenization import CellTokenizer, TokenizerConfig, tokenize_anndata, vocab_of_tokens

    x = np.zeros((6, 5), dtype=np.float32)
    x[:, 0] = 9  # always the top gene
    x[:, 1] = 1  # expressed everywhere, never kept (max_seq_len 2)
    x[:4, 2] = 5  # kept in 4 cells
    x[4:, 3] = 5  # kept in 2 cells; gene 4 never expressed
    adata = ad.AnnData(sp.csr_matrix(x), var=pd.DataFrame(index=["A1", "A2", "A3", "A4", "A5"]))
    config = TokenizerConfig(gene_id_mode="raw", max_seq_len=2)
    tokenizer = CellTokenizer(build_vocab([adata], gene_id_mode="raw", min_cells=1), config)
    assert vocab_of_tokens([adata], tokenizer).genes == ["A1", "A3", "A4"]
    assert vocab_of_tokens([adata], tokenizer, min_cells=3).genes == ["A1", "A3"]
    cut = CellTokenizer(vocab_of_tokens([adata], tokenizer), config)
    assert cut.vocab.specials == tokenizer.vocab.specials

    def token_genes(tok):
        cells = tokenize_anndata(adata, tok).cells
        return [sorted(tok.vocab.id_to_token[i] for i in cells.cell(c)[0]) for c in range(len(cells))]

    assert token_genes(cut) == token_genes(tokenizer)
