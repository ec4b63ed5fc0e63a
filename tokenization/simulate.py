"""A documented simulator of single-cell counts, used by the quickstart and by tests.

Model (per cell ``c`` of type ``t`` in batch ``b``, gene ``g``):

- base log-expression ``mu_g ~ Normal(-1, 1.5)`` over genes (a few genes high, most low);
- each cell type has ``n_markers`` marker genes whose log-expression is raised by ``marker_lfc``;
- each batch multiplies every gene by ``exp(Normal(0, batch_sd))`` (a gene-wise batch effect);
- library size ``L_c ~ LogNormal(log(mean_library), 0.3)``;
- counts ``~ NegativeBinomial(mean = L_c * softmax(log-expression)_g, dispersion = theta)``.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .anndata_io import InputError


def simulate_counts(
    n_cells: int = 2000,
    n_genes: int = 600,
    n_cell_types: int = 5,
    n_batches: int = 2,
    n_markers: int = 25,
    marker_lfc: float = 2.5,
    batch_sd: float = 0.4,
    mean_library: float = 3000.0,
    theta: float = 5.0,
    seed: int = 0,
) -> ad.AnnData:
    """Simulate raw counts with cell types and batches.

    Returns
    -------
    AnnData with integer counts in ``X`` (CSR float32), ``obs['cell_type']``, ``obs['batch']`` and
    gene names ``SIM00001``... in ``var_names``.
    """
    rng = np.random.default_rng(seed)
    base = rng.normal(-1.0, 1.5, size=n_genes)
    type_effect = np.zeros((n_cell_types, n_genes))
    for t in range(n_cell_types):
        markers = rng.choice(n_genes, size=n_markers, replace=False)
        type_effect[t, markers] = marker_lfc
    batch_effect = rng.normal(0.0, batch_sd, size=(n_batches, n_genes))
    types = rng.integers(0, n_cell_types, size=n_cells)
    batches = rng.integers(0, n_batches, size=n_cells)
    logits = base[None] + type_effect[types] + batch_effect[batches]  # (cells, genes)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    library = rng.lognormal(np.log(mean_library), 0.3, size=n_cells)
    mean = library[:, None] * probs
    # NB as a Gamma-Poisson mixture with shape theta
    counts = rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32)
    adata = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame(
            {
                "cell_type": pd.Categorical([f"type_{t}" for t in types]),
                "batch": pd.Categorical([f"batch_{b}" for b in batches]),
            },
            index=[f"cell{i:06d}" for i in range(n_cells)],
        ),
        var=pd.DataFrame(index=[f"SIM{g + 1:05d}" for g in range(n_genes)]),
    )
    return adata


def simulate_proteins(adata: ad.AnnData, n_proteins: int = 20, *, labels_key: str = "cell_type",
                      background: float = 20.0, foreground: float = 200.0, theta: float = 10.0,
                      seed: int = 0) -> ad.AnnData:
    """Simulate a CITE-seq-like protein panel for the cells of ``adata``, driven by their cell types.

    Each protein is expressed above an ambient background by a random half of the cell types (one type
    at least): its mean is ``background`` in the other types and ``foreground * U(0.5, 1.5)`` in those;
    counts are negative binomial with dispersion ``theta``. So protein levels are predictable from the
    RNA only through the cell type, as for real surface markers.

    Returns
    -------
    AnnData with the same ``obs_names`` and ``obs`` as ``adata``, integer counts in ``X`` (dense float32)
    and protein names ``PROT01``... in ``var_names``.
    """
    if labels_key not in adata.obs:
        raise InputError(f"simulate_proteins needs obs[{labels_key!r}], the cell types that drive the panel; "
                         "pass labels_key=<your cell-type column>.")
    rng = np.random.default_rng(seed)
    types = pd.Categorical(adata.obs[labels_key]).codes  # (cells,)
    n_types = int(types.max()) + 1
    expressed = rng.random((n_types, n_proteins)) < 0.5
    expressed[rng.integers(0, n_types, size=n_proteins), np.arange(n_proteins)] = True
    level = np.where(expressed, foreground * rng.uniform(0.5, 1.5, size=(n_types, n_proteins)), background)
    mean = level[types]  # (cells, proteins)
    counts = rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32)
    return ad.AnnData(X=counts, obs=adata.obs.copy(),
                      var=pd.DataFrame(index=[f"PROT{p + 1:02d}" for p in range(n_proteins)]))
