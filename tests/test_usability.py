"""Silent or unclear behaviour made explicit (issue 13, items 10-12): unlabeled cells are counted aloud, a batch
key that names no column is refused, empty files get a message saying what was found, the same seed gives the
same fine-tuned weights, and key=value overrides are read wherever they stand on the command line."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from atlasformer.cli import build_parser, main, single_value_options, split_overrides
from atlasformer.finetune import Annotator, FinetuneConfig, Imputer, annotate
from atlasformer.tokenization import InputError, read_h5ad
from atlasformer.tokenization.data import resolve_genes

TINY = {"d_model": 16, "n_layers": 1, "n_heads": 2, "dropout": 0.1}


def tiny_cfg(**kw):
    base = dict(from_scratch=True, scratch_model=TINY, max_seq_len=32, epochs=1,
                batch_size=32, lr=2e-3, head_lr=3e-3, seed=0)
    return FinetuneConfig(**{**base, **kw})


def test_unlabelled_cells_are_counted_aloud(sim_adata, capsys):
    adata = sim_adata.copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object)
    adata.obs.loc[adata.obs_names[:200], "cell_type"] = np.nan
    Annotator(None, tiny_cfg(), labels_key="cell_type").fit(adata)
    assert "200 of 600 cells have no label in obs['cell_type']" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["annotation", "imputation"])
def test_a_batch_key_that_names_no_column_is_refused(sim_h5ad, tmp_path, capsys, task):
    labels = ["--labels-key", "cell_type"] if task == "annotation" else []
    assert main(["finetune", task, "--data", str(sim_h5ad), "--from-scratch", "--output", str(tmp_path / "o"),
                 "--batch-key", "missing_column", *labels, "epochs=1"]) == 2
    err = capsys.readouterr().err
    assert "batch_key='missing_column' is not a column of obs" in err and "--batch-key" in err


def test_empty_files_say_what_was_found(sim_adata, tmp_path, capsys):
    no_cells = tmp_path / "no_cells.h5ad"
    sim_adata[:0].copy().write_h5ad(no_cells)
    no_genes = tmp_path / "no_genes.h5ad"
    ad.AnnData(X=sp.csr_matrix((5, 0), dtype=np.float32)).write_h5ad(no_genes)
    with pytest.raises(InputError, match="holds 0 cells"):
        read_h5ad(no_cells)
    with pytest.raises(InputError, match="0 genes"):
        read_h5ad(no_genes)
    with pytest.raises(InputError, match="0 genes"):  # in memory through the Python API: not "names were lost"
        resolve_genes(ad.AnnData(X=np.zeros((5, 0), dtype=np.float32)))
    assert main(["tokenize", "--data", str(no_cells), "--output", str(tmp_path / "corpus")]) == 2
    assert "holds 0 cells" in capsys.readouterr().err
    assert not (tmp_path / "corpus").exists()  # refused before a corpus folder was started


@pytest.mark.parametrize("task_cls,kw", [(Annotator, {"labels_key": "cell_type"}), (Imputer, {})])
def test_same_seed_gives_the_same_fine_tuned_weights(sim_adata, task_cls, kw):
    def weights():
        task = task_cls(None, tiny_cfg(mode="full", max_steps=3, val_fraction=0.2), **kw)
        task.fit(sim_adata.copy())
        return task.model.state_dict()

    torch.manual_seed(123)  # the caller's random state must not matter
    first = weights()
    torch.manual_seed(456)
    second = weights()
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_overrides_are_read_wherever_they_stand():
    single = single_value_options(build_parser())
    flags, overrides = split_overrides(["finetune", "annotation", "--data", "a.h5ad", "--query", "q.h5ad", "epochs=2",
                                        "--labels-key", "cell_type", "lr=1e-3"], single)
    assert overrides == ["epochs=2", "lr=1e-3"]
    assert flags == ["finetune", "annotation", "--data", "a.h5ad", "--query", "q.h5ad", "--labels-key", "cell_type"]
    _, overrides = split_overrides(["hub", "push", "m", "org/name", "--commit-message", "lr=1e-3 tried"], single)
    assert overrides == []  # the value of a single-value option stays with it


def test_an_override_after_query_reaches_the_config(sim_h5ad, tmp_path, capsys):
    """A bad override after --query is refused before training starts (it is parsed, not taken for a file)."""
    assert main(["finetune", "annotation", "--data", str(sim_h5ad), "--from-scratch", "--labels-key", "cell_type",
                 "--output", str(tmp_path / "o"), "--query", str(sim_h5ad), "epochs=many"]) == 2
    assert "epochs" in capsys.readouterr().err
    assert not (tmp_path / "o" / "model").exists()


def test_annotate_leaves_the_annotator_unchanged_and_honours_layer(sim_adata):
    """Item 14: no side effects on arguments, every keyword honoured."""
    annotator = Annotator(None, tiny_cfg(), labels_key="cell_type")
    annotator.fit(sim_adata.copy())
    before = (annotator.config.unknown_threshold, annotator.layer)
    query = sim_adata.copy()
    query.layers["raw"] = query.X.copy()
    query.X = query.X[np.random.default_rng(0).permutation(query.n_obs)]  # X: other cells' counts than the layer
    annotate(query, annotator, unknown_threshold=0.999999, layer="raw")
    assert (annotator.config.unknown_threshold, annotator.layer) == before
    unknown = (query.obs["atlasformer_label"] == "unknown").to_numpy()
    assert np.array_equal(unknown, query.obs["atlasformer_confidence"].to_numpy() < 0.999999)  # applied to this call
    with_layer = query.obs["atlasformer_confidence"].to_numpy()
    annotate(query, annotator)  # X: the shuffled counts, so other confidences than from the layer
    assert not np.allclose(with_layer, query.obs["atlasformer_confidence"].to_numpy())


def test_one_process_runs_jobs_of_different_precisions_one_after_the_other():
    """A notebook pretrains in bf16, then fine-tunes in fp32: accelerate's process-wide state must not refuse."""
    from atlasformer.pretrain.engine import Engine

    Engine(precision="bf16", seed=0).close()
    assert Engine(precision="fp32", seed=0).accelerator.mixed_precision == "no"
    assert Engine(precision="bf16", seed=0).accelerator.mixed_precision == "bf16"
