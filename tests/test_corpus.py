"""Corpus building: content equals in-memory tokenization, manifest and checksums, crash-safe resume,
bad inputs (empty cells, corrupt files, no overlap, mixed species), SOMA input, Hugging Face export."""

import json
import shutil

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from atlasformer.cli import main as cli_main
from atlasformer.tokenization import (
    CellTokenizer,
    Corpus,
    CorpusConfig,
    GeneVocab,
    InputError,
    TokenizerConfig,
    build_corpus,
    corpus_format,
    export_hf_dataset,
    gene_nonzero_medians,
    read_h5ad,
    simulate_counts,
    tokenize_anndata,
)


def quiet(_):
    pass


def sim_file(path, n_cells=300, seed=0, prefix="ENSG", empty_rows=(), n_genes=120):
    adata = simulate_counts(n_cells=n_cells, n_genes=n_genes, n_cell_types=3, n_batches=2, seed=seed)
    adata.var_names = [f"{prefix}{i:011d}" for i in range(adata.n_vars)]
    if len(empty_rows):
        x = adata.X.tolil()
        x[list(empty_rows)] = 0
        adata.X = sp.csr_matrix(x)
    adata.write_h5ad(path)
    return path


def shard_cells(corpus: Corpus, source: int):
    """Every cell of one input, concatenated over its shards: (gene id list, value list) per cell."""
    out = []
    for i, shard in enumerate(corpus.shards):
        if shard["input"] != source:
            continue
        cells = corpus.read(i, 0, shard["n_cells"])
        out += [tuple(map(np.asarray, cells.cell(j))) for j in range(len(cells))]
    return out


def config(**kw):
    return CorpusConfig(**{"tokenizer": TokenizerConfig(max_seq_len=64), "shard_size": 100, "chunk_size": 40, **kw})


@pytest.mark.shared_data
def test_corpus_from_symbol_and_ensembl_files_equals_in_memory_tokenization(tmp_path, shared_data):
    files = [shared_data("pbmc_sorted_reference.h5ad"), shared_data("kang_pbmc_8donors.h5ad")]
    manifest = build_corpus(files, tmp_path / "corpus", config=config(labels_key="cell_type", shard_size=5000,
                                                                      chunk_size=1024), log=quiet)
    corpus = Corpus(tmp_path / "corpus", verify=True)
    tokenizer = corpus.tokenizer
    assert [r["n_cells"] for r in manifest["inputs"]] == [2140, 12261]
    assert len(corpus) == sum(r["n_cells_kept"] for r in manifest["inputs"]) == manifest["n_cells"]
    # symbols and Ensembl IDs meet in one vocabulary of canonical keys
    assert "ENSG00000010610" in tokenizer.vocab  # CD4, given as a symbol in one file and an Ensembl ID in the other
    routes = [r["gene_ids"]["routes"] for r in manifest["inputs"]]
    assert routes[0]["symbol"] > 7500 and routes[1]["ensembl"] > 1200
    assert len(tokenizer.vocab) < 3 + 8863 + 1287  # shared genes share tokens
    offset = 0
    for i, path in enumerate(files):
        adata = read_h5ad(path)
        expected = tokenize_anndata(adata, tokenizer, source=str(path), cell_offset=offset).cells
        offset += adata.n_obs
        got = shard_cells(corpus, i)
        assert len(got) == len(expected)
        for j in (0, len(got) // 2, len(got) - 1):
            genes, values = expected.cell(j)
            np.testing.assert_array_equal(got[j][0], genes)
            np.testing.assert_array_equal(got[j][1], values)
    obs = corpus.obs(len(corpus.shards) - 1)
    assert set(obs.columns) == {"source", "cell_index", "obs_name", "cell_type"}
    assert set(obs["cell_type"]) <= set(manifest["obs_values"]["cell_type"]) and (obs["source"] == 1).all()


def test_manifest_checksums_and_damage_detection(tmp_path):
    build_corpus([sim_file(tmp_path / "a.h5ad")], tmp_path / "corpus", config=config(), log=quiet)
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 3 and manifest["n_cells"] == 300
    assert manifest["dtypes"] == {"gene_ids": "uint16", "values": "uint8"}
    assert set(manifest["tokenizer_files"]) == {"vocab.json", "tokenizer_config.json"}
    for shard in manifest["shards"]:
        for name, info in shard["files"].items():
            assert corpus_format.sha256_file(tmp_path / "corpus" / shard["name"] / name) == info["sha256"]
    Corpus(tmp_path / "corpus", verify=True)
    values = tmp_path / "corpus" / "shard-00001" / "values.npy"
    data = bytearray(values.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    values.write_bytes(bytes(data))
    Corpus(tmp_path / "corpus")  # sizes still match
    with pytest.raises(InputError, match="checksum mismatch"):
        Corpus(tmp_path / "corpus", verify=True)
    values.write_bytes(bytes(data[:-10]))
    with pytest.raises(InputError, match="wrong size"):
        Corpus(tmp_path / "corpus")
    # rerunning the build rewrites the damaged shard (and the later ones of its input) and completes again
    build_corpus([tmp_path / "a.h5ad"], tmp_path / "corpus", config=config(), log=quiet)
    repaired = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert repaired["complete"] and repaired["n_cells"] == 300 and len(repaired["shards"]) == 3
    Corpus(tmp_path / "corpus", verify=True)


def test_build_killed_midway_resumes_to_the_same_corpus(tmp_path, monkeypatch):
    files = [sim_file(tmp_path / "a.h5ad"), sim_file(tmp_path / "b.h5ad", seed=1, n_cells=250)]
    build_corpus(files, tmp_path / "reference", config=config(), log=quiet)

    real_commit, calls = corpus_format.ShardWriter.commit, []

    def crash_on_fourth(self):
        calls.append(self.name)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return real_commit(self)

    monkeypatch.setattr(corpus_format.ShardWriter, "commit", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(files, tmp_path / "corpus", config=config(), log=quiet)
    monkeypatch.undo()
    partial = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert not partial["complete"] and [s["name"] for s in partial["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
    assert not list((tmp_path / "corpus").glob(".tmp-*"))  # the interrupted shard was removed
    with pytest.raises(InputError, match="did not finish"):
        Corpus(tmp_path / "corpus")
    # a hard kill can leave a temporary folder and a renamed but unlisted shard: both are ignored and removed
    (tmp_path / "corpus" / ".tmp-shard-00003").mkdir()
    shutil.copytree(tmp_path / "corpus" / "shard-00002", tmp_path / "corpus" / "shard-00003")

    encoded = []
    real_encode = CellTokenizer.encode
    monkeypatch.setattr(CellTokenizer, "encode", lambda self, *a, **k: encoded.append(1) or real_encode(self, *a, **k))
    build_corpus(files, tmp_path / "corpus", config=config(), log=quiet)
    assert len(encoded) == 8  # only b.h5ad was tokenized again: 250 rows in shards of 100, chunks of 40
    resumed, reference = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("corpus", "reference"))
    assert resumed["complete"] and not list((tmp_path / "corpus").glob(".tmp-*"))
    assert [s["files"] for s in resumed["shards"]] == [s["files"] for s in reference["shards"]]
    assert sorted(p.name for p in (tmp_path / "corpus").glob("shard-*")) == [s["name"] for s in resumed["shards"]]


def corrupt_late_chunk(src, dst):
    """Copy an h5ad (gzip-compressed X) and damage the last chunk of X/data: it opens, but late rows fail."""
    with h5py.File(src) as f:
        info = f["X/data"].id.get_chunk_info(f["X/data"].id.get_num_chunks() - 1)
    shutil.copy(src, dst)
    with open(dst, "r+b") as fh:
        fh.seek(info.byte_offset + 10)
        fh.write(b"\x00\xff" * 200)
    return dst


def test_corrupt_h5ad_stops_without_a_complete_looking_shard_and_rerun_restarts(tmp_path):
    adata = simulate_counts(n_cells=600, n_genes=300, seed=0)
    adata.write_h5ad(tmp_path / "good.h5ad", compression="gzip")
    bad = corrupt_late_chunk(tmp_path / "good.h5ad", tmp_path / "bad.h5ad")
    with pytest.raises(InputError, match="bad.h5ad: cannot read cells"):
        build_corpus([bad], tmp_path / "corpus", config=config(shard_size=200, chunk_size=100), log=quiet)
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert not manifest["complete"]
    assert sorted(p.name for p in (tmp_path / "corpus").glob("shard-*")) == [s["name"] for s in manifest["shards"]]
    assert not list((tmp_path / "corpus").glob(".tmp-*"))
    # a truncated file fails when opened, before anything is written
    truncated = tmp_path / "truncated.h5ad"
    truncated.write_bytes((tmp_path / "good.h5ad").read_bytes()[:50_000])
    with pytest.raises(InputError, match="truncated.h5ad: cannot be read as h5ad"):
        build_corpus([truncated], tmp_path / "other", config=config(), log=quiet)
    assert not (tmp_path / "other").exists()
    # the user replaces the bad file: other inputs, so the unfinished build restarts cleanly
    build_corpus([tmp_path / "good.h5ad"], tmp_path / "corpus", config=config(shard_size=200, chunk_size=100), log=quiet)
    assert Corpus(tmp_path / "corpus", verify=True).manifest["n_cells"] == 600
    # a complete corpus is never silently replaced
    with pytest.raises(InputError, match="overwrite=true"):
        build_corpus([tmp_path / "good.h5ad"], tmp_path / "corpus", config=config(shard_size=300), log=quiet)


def test_skip_mode_excludes_and_reports_bad_files(tmp_path):
    good = sim_file(tmp_path / "good.h5ad")
    nameless = simulate_counts(n_cells=50, n_genes=40, seed=3)
    nameless.var_names = [str(i) for i in range(40)]  # lost gene names
    nameless.write_h5ad(tmp_path / "nameless.h5ad")
    adata = simulate_counts(n_cells=600, n_genes=300, seed=0)
    adata.var_names = [f"ENSG{i:011d}" for i in range(300)]
    adata.write_h5ad(tmp_path / "z.h5ad", compression="gzip")
    bad = corrupt_late_chunk(tmp_path / "z.h5ad", tmp_path / "late_corrupt.h5ad")
    inputs = [good, tmp_path / "nameless.h5ad", bad]
    with pytest.raises(InputError, match="nameless.h5ad: no overlap"):
        build_corpus(inputs, tmp_path / "strict", config=config(), log=quiet)
    manifest = build_corpus(inputs, tmp_path / "corpus", config=config(on_bad_input="skip"), log=quiet)
    assert [e["path"] for e in manifest["excluded"]] == [str(tmp_path / "nameless.h5ad")]
    late = manifest["inputs"][1]
    assert late["status"] == "excluded" and "cannot read cells" in late["error"] and late["shards"] == []
    corpus = Corpus(tmp_path / "corpus", verify=True)
    assert len(corpus) == 300 and {s["input"] for s in corpus.shards} == {0}


def test_empty_cells_are_dropped_and_counted(tmp_path):
    manifest = build_corpus([sim_file(tmp_path / "a.h5ad", empty_rows=[0, 5, 150, 299])], tmp_path / "corpus",
                            config=config(), log=quiet)
    record = manifest["inputs"][0]
    assert (record["n_cells"], record["n_cells_kept"], record["n_empty_dropped"]) == (300, 296, 4)
    obs = pd.concat([Corpus(tmp_path / "corpus").obs(i) for i in range(3)])
    assert not {0, 5, 150, 299} & set(obs["cell_index"]) and len(obs) == 296


def test_model_vocabulary_without_overlap_and_mixed_species_are_errors(tmp_path):
    human = sim_file(tmp_path / "human.h5ad")
    mouse = sim_file(tmp_path / "mouse.h5ad", prefix="ENSMUSG", seed=2)
    other = CellTokenizer(GeneVocab([f"ENSG{i:011d}" for i in range(500, 900)]), TokenizerConfig(max_seq_len=64))
    with pytest.raises(InputError, match="human.h5ad: no overlap with the vocabulary"):
        build_corpus([human], tmp_path / "c0", other, config=config(), log=quiet)
    with pytest.raises(InputError, match="different species.*human.h5ad: human.*mouse.h5ad: mouse"):
        build_corpus([human, mouse], tmp_path / "c1", config=config(), log=quiet)
    manifest = build_corpus([human, mouse], tmp_path / "c2", config=config(allow_mixed_species=True), log=quiet)
    assert [r["species"] for r in manifest["inputs"]] == ["human", "mouse"]
    # a model's vocabulary is kept as it is: a corpus for that model
    partial = CellTokenizer(GeneVocab([f"ENSG{i:011d}" for i in range(0, 100)]), TokenizerConfig(max_seq_len=64))
    manifest = build_corpus([human], tmp_path / "c3", partial, config=config(), log=quiet)
    totals = np.asarray(ad.read_h5ad(human).X.sum(0)).ravel()  # (120 genes,): the overlap is the share of counts
    assert manifest["vocab_size"] == 103
    assert manifest["inputs"][0]["overlap"] == pytest.approx(totals[:100].sum() / totals.sum())


def test_soma_experiment_input_matches_the_h5ad(tmp_path):
    tiledbsoma_io = pytest.importorskip("tiledbsoma.io")
    adata = ad.read_h5ad(sim_file(tmp_path / "a.h5ad", n_cells=230))
    tiledbsoma_io.from_anndata(str(tmp_path / "soma"), adata, measurement_name="RNA")
    from_h5ad = build_corpus([tmp_path / "a.h5ad"], tmp_path / "c_h5ad", config=config(batch_key="batch"), log=quiet)
    from_soma = build_corpus([tmp_path / "soma"], tmp_path / "c_soma", config=config(batch_key="batch"), log=quiet)
    assert from_soma["inputs"][0]["kind"] == "soma" and from_soma["n_cells"] == 230
    a, b = Corpus(tmp_path / "c_h5ad"), Corpus(tmp_path / "c_soma")
    for i in range(len(a.shards)):
        x, y = a.read(i, 0, a.shards[i]["n_cells"]), b.read(i, 0, b.shards[i]["n_cells"])
        np.testing.assert_array_equal(x.offsets, y.offsets)
        np.testing.assert_array_equal(x.gene_ids, y.gene_ids)
        np.testing.assert_array_equal(x.values, y.values)
        pd.testing.assert_frame_equal(a.obs(i).drop(columns="source"), b.obs(i).drop(columns="source"))
    assert from_h5ad["obs_values"] == from_soma["obs_values"]


def test_rank_corpus_medians_and_hugging_face_export(tmp_path):
    datasets = pytest.importorskip("datasets")
    files = [sim_file(tmp_path / "a.h5ad"), sim_file(tmp_path / "b.h5ad", seed=1, n_cells=90)]
    code = cli_main(["tokenize", "--data", *map(str, files), "--output", str(tmp_path / "corpus"), "--batch-key", "batch",
                     "kind=rank", "max_seq_len=32", "shard_size=100", "--export-hf", str(tmp_path / "hf")])
    assert code == 0
    corpus = Corpus(tmp_path / "corpus")
    expected = gene_nonzero_medians([read_h5ad(f) for f in files], vocab=corpus.tokenizer.vocab)
    assert corpus.tokenizer.gene_medians == pytest.approx(expected)
    dataset = datasets.load_from_disk(str(tmp_path / "hf"))
    assert len(dataset) == len(corpus) == 390 and {"input_ids", "length", "source", "batch"} <= set(dataset.column_names)
    first = corpus.read(0, 0, 3)
    for j in range(3):
        assert dataset[j]["input_ids"] == first.cell(j)[0].tolist() and dataset[j]["length"] == len(first.cell(j)[0])
    assert dataset[len(dataset) - 1]["source"] == "b"
    assert (tmp_path / "hf" / "gene_medians.json").exists()
    binned = build_corpus([files[0]], tmp_path / "binned", config=config(), log=quiet)
    assert binned["kind"] == "binned"
    with pytest.raises(InputError, match="rank-value"):
        export_hf_dataset(tmp_path / "binned", tmp_path / "hf2")
