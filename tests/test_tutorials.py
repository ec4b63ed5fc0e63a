"""Every task tutorial under docs/tutorials runs end to end on its simulated data and writes what it promises."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "docs" / "tutorials"
EXPECTED = {
    "annotation": ["model/config.json", "metrics.json", "confusion_matrix.png", "reference.h5ad"],
    "integration": ["model/config.json", "metrics.json", "umap_batch.png", "umap_cell_type.png", "cells.h5ad"],
    "imputation": ["model/config.json", "metrics.json", "imputation_mcv.png", "cells.h5ad"],
    "modality": ["model/config.json", "metrics.json", "protein_predicted_vs_observed.png", "cells.h5ad"],
    "mapping": ["mapping.png", "mapping.json", "query.h5ad", "index/index.faiss", "index/obs.parquet", "index/index.json",
                "query_neighbours.csv"],
    "genes": ["gene_embeddings.h5ad", "programs.csv", "enrichment.csv", "attention_edges.csv",
              "perturbation_ranked.csv", "perturbation_per_cell.csv"],
    "cells": ["clusters.png", "clusters_model.png", "cluster.json", "cells.h5ad", "trajectory.png", "trajectory.json",
              "trajectory.h5ad"],
}


def test_task_tutorials_exist():
    assert set(EXPECTED) <= {p.stem for p in TUTORIALS.glob("*.py")}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tutorial_runs(name, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    run = subprocess.run([sys.executable, str(TUTORIALS / f"{name}.py"), str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    for rel in EXPECTED[name]:
        assert (tmp_path / name / rel).exists(), f"{name}: {rel} missing; stdout:\n{run.stdout[-2000:]}"
