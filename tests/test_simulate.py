"""The simulator behind the quickstart: counts with cell types and batches, and a paired protein panel."""

import numpy as np
import pytest

from atlasformer.tokenization import InputError, simulate_counts, simulate_proteins


def test_simulated_proteins_follow_the_cell_types_of_the_same_cells():
    adata = simulate_counts(n_cells=400, n_genes=50, n_cell_types=4, seed=3)
    proteins = simulate_proteins(adata, n_proteins=12, seed=3)
    assert proteins.shape == (400, 12) and list(proteins.obs_names) == list(adata.obs_names)
    x = np.asarray(proteins.X)
    assert (x >= 0).all() and np.array_equal(x, np.round(x))
    types = adata.obs["cell_type"].to_numpy()
    means = np.stack([x[types == t].mean(0) for t in np.unique(types)])  # (types, proteins)
    # every protein is expressed above the ambient background (20) by at least one type
    assert (means.max(0) > 3 * 20).all() and (means.min() < 2 * 20)
    assert np.array_equal(simulate_proteins(adata, n_proteins=12, seed=3).X, x)


def test_simulated_proteins_need_the_labels():
    adata = simulate_counts(n_cells=20, n_genes=50, seed=0)
    with pytest.raises(InputError, match="obs\\['celltype'\\]"):
        simulate_proteins(adata, labels_key="celltype")
