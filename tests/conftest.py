"""Shared fixtures: tiny simulated data, and access to ../shared/data (skip locally, fail under CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from atlasformer.tokenization import simulate_counts

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ATLASFORMER_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_file(name: str) -> Path:
    """Path of a file in ../shared/data; skips the test where it is absent, fails under CI=true."""
    path = SHARED_DATA / name
    if not path.exists():
        message = f"{path} not found: real-data tests need ../shared/data beside the checkout"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def shared_data():
    """``shared_data("pbmc4k_10x_v2.h5ad")`` -> Path, with the skip / fail rule of :func:`shared_file`."""
    return shared_file


@pytest.fixture(scope="session")
def sim_adata():
    """A small simulated dataset: 600 cells, 300 genes, 4 cell types, 2 batches."""
    return simulate_counts(n_cells=600, n_genes=300, n_cell_types=4, n_batches=2, seed=0)


@pytest.fixture
def sim_h5ad(tmp_path, sim_adata):
    path = tmp_path / "sim.h5ad"
    sim_adata.write_h5ad(path)
    return path
