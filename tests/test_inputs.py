"""Bad input yields a clear error that names the problem and the fix."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from atlasformer.checkpoints import CheckpointError, load_model_folder
from atlasformer.tokenization import (
    CellTokenizer,
    GeneVocab,
    InputError,
    TokenizerConfig,
    build_vocab,
    read_h5ad,
    tokenize_anndata,
)
from atlasformer.tokenization.anndata_io import check_obs_key


def make(x, genes=None):
    x = sp.csr_matrix(np.asarray(x, dtype=np.float32))
    genes = genes or [f"G{i}" for i in range(x.shape[1])]
    return ad.AnnData(X=x, obs=pd.DataFrame(index=[f"c{i}" for i in range(x.shape[0])]), var=pd.DataFrame(index=genes))


def tokenize(adata, vocab=None, **kw):
    vocab = vocab or build_vocab([adata])
    return tokenize_anndata(adata, CellTokenizer(vocab, TokenizerConfig(**kw)), source="my.h5ad")


COUNTS = np.array([[1, 0, 3, 2], [0, 5, 1, 0], [2, 2, 0, 1]])


def test_log_normalised_values_name_the_layer_fix():
    logged = np.log1p(COUNTS / COUNTS.sum(1, keepdims=True) * 1e4)
    with pytest.raises(InputError, match=r"not integer counts.*layer='counts'"):
        tokenize(make(logged))


def test_nan_and_inf():
    bad = COUNTS.astype(float)
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN or infinite"):
        tokenize(make(bad))
    bad[0, 0] = np.inf
    with pytest.raises(InputError, match="NaN or infinite"):
        tokenize(make(bad))


def test_negative_values():
    bad = COUNTS.astype(float)
    bad[1, 1] = -2
    with pytest.raises(InputError, match="negative values"):
        tokenize(make(bad))


def test_empty_matrix():
    with pytest.raises(InputError, match="empty|no cells"):
        tokenize(make(np.zeros((0, 4))), vocab=GeneVocab(["G0", "G1", "G2", "G3"]))
    with pytest.raises(InputError, match="every value is zero"):
        tokenize(make(np.zeros((3, 4))))


def test_duplicate_gene_names():
    with pytest.raises(InputError, match="duplicate gene names.*var_names_make_unique"):
        tokenize(make(COUNTS, genes=["A", "B", "A", "C"]))


def test_missing_labels_key():
    with pytest.raises(InputError, match="labels_key='cell_type' is not a column"):
        check_obs_key(make(COUNTS).obs, "cell_type", source="my.h5ad")


def test_low_overlap_is_an_error_and_medium_overlap_warns(capsys):
    vocab = GeneVocab([f"X{i}" for i in range(40)] + ["G0"])
    adata = make(np.ones((3, 20)), genes=[f"G{i}" for i in range(20)])
    with pytest.raises(InputError, match=r"only 5.0% of its counts are on genes in the model's vocabulary "
                       r"\(1 of its 20 expressed genes\)"):
        tokenize(adata, vocab=vocab)
    vocab = GeneVocab([f"G{i}" for i in range(6)])
    tokenize(adata, vocab=vocab)
    assert "warning" in capsys.readouterr().err


def test_overlap_weighs_genes_by_their_counts(capsys, tmp_path):
    """A vocabulary of the genes that carry the counts passes, though most rarely seen genes are missing from it;
    one that misses the highly expressed genes fails, though it holds most genes. A backed file (read chunk by
    chunk) gets the same figure."""
    x = np.ones((3, 20))
    x[:, :4] = 100  # 4 of 20 genes carry 1200 of the file's 1248 counts
    x[:, 19] = 0  # an unexpressed gene outside the vocabulary is not reported as dropped
    adata = make(x, genes=[f"G{i}" for i in range(20)])
    vocab = build_vocab([adata[:, :4]])
    data = tokenize(adata, vocab=vocab)  # 20% of genes, 96% of counts
    assert data.report.overlap == pytest.approx(1200 / 1245) and "warning" not in capsys.readouterr().err
    assert data.report.dropped_genes == [f"G{i}" for i in range(4, 19)]
    adata.write_h5ad(tmp_path / "f.h5ad")
    backed = tokenize_anndata(ad.read_h5ad(tmp_path / "f.h5ad", backed="r"), CellTokenizer(vocab, TokenizerConfig()),
                              source="f.h5ad", chunk_size=2)
    assert backed.report.overlap == data.report.overlap and backed.report.dropped_genes == data.report.dropped_genes
    with pytest.raises(InputError, match=r"only 3.6% of its counts .* \(15 of its 19 expressed genes\)"):
        tokenize(adata, vocab=build_vocab([adata[:, 4:]]))  # 80% of genes, 3.6% of counts


def test_empty_cells_are_dropped_and_counted():
    x = COUNTS.copy()
    x[1] = 0
    data = tokenize(make(x))
    assert data.report.n_empty_dropped == 1 and len(data.cells) == 2
    assert list(data.obs.index) == ["c0", "c2"]


def test_corrupt_file_names_the_file(tmp_path):
    path = tmp_path / "broken.h5ad"
    make(COUNTS).write_h5ad(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError, match="broken.h5ad.*truncated or corrupt"):
        read_h5ad(path)


def test_checkpoint_with_missing_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"missing \['model.safetensors'\]"):
        load_model_folder(tmp_path)


def test_missing_layer():
    adata = make(COUNTS)
    vocab = build_vocab([adata])
    with pytest.raises(InputError, match="layer 'counts' not found"):
        tokenize_anndata(adata, CellTokenizer(vocab), layer="counts")
