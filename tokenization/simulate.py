"""Documented simulators of single-cell counts, used by the quickstart, tests and benchmarks.

:func:`simulate_counts` draws discrete cell types and batches; :func:`simulate_trajectory` draws cells along a
branching trajectory with known time (its model is in its docstring). :func:`simulate_counts`'s model (per cell ``c`` of type ``t`` in batch ``b``, gene ``g``):

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


def negative_binomial_counts(logits: np.ndarray, mean_library: float, theta: float,
                             rng: np.random.Generator) -> np.ndarray:
    """(cells, genes) float32 counts: each cell's gene shares are the softmax of its ``logits``, its library size
    ``LogNormal(log(mean_library), 0.3)``, and each count negative binomial with that mean and shape ``theta``
    (drawn as a Gamma-Poisson mixture)."""
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    library = rng.lognormal(np.log(mean_library), 0.3, size=len(logits))
    mean = library[:, None] * probs
    return rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32)


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
    counts = negative_binomial_counts(logits, mean_library, theta, rng)
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


def simulate_trajectory(
    n_cells: int = 2000,
    n_genes: int = 500,
    *,
    n_branches: int = 2,
    branch_time: float = 0.3,
    dynamic_fraction: float = 0.5,
    program_lfc: float = 2.0,
    program_width: float = 0.15,
    mean_library: float = 3000.0,
    theta: float = 5.0,
    seed: int = 0,
) -> ad.AnnData:
    """Simulate raw counts of cells along a branching trajectory with known time.

    Model (per cell ``c`` with time ``t_c``, gene ``g``):

    - time ``t_c ~ Uniform(0, 1)``; cells with ``t_c < branch_time`` are on the trunk, later cells each
      join one of ``n_branches`` branches with equal probability (``n_branches=1``: a linear trajectory);
    - base log-expression ``mu_g ~ Normal(-1, 1.5)``, as in :func:`simulate_counts`;
    - a ``dynamic_fraction`` of the genes follow a program of time, the others stay at ``mu_g``. Half the
      programmed genes are shared by every cell (trunk and branches alike), the rest are split evenly among
      the branches. A program is, with equal probability, a rising sigmoid ``s((t - m) / w)``, a falling
      one ``1 - s((t - m) / w)`` or a transient bump ``exp(-(t - m)^2 / (2 w^2))`` with ``w =
      program_width``, times an amplitude ``program_lfc * U(0.5, 1.5)``, added to the log-expression.
      Shared programs have ``m ~ U(0, 1)``; a branch's programs have ``m ~ U(branch_time, 1)``;
    - a branch's programs are switched on by a smooth ramp ``r(t) = smoothstep((t - branch_time) / w)``
      (0 up to the branch point, 1 from ``branch_time + w``), so every branch leaves the trunk
      continuously: at ``branch_time`` all branches express what the trunk does;
    - library size ``L_c ~ LogNormal(log(mean_library), 0.3)``;
    - counts ``~ NegativeBinomial(mean = L_c * softmax(log-expression)_g, dispersion = theta)``.

    Parameters
    ----------
    n_cells, n_genes
        Size of the simulated matrix.
    n_branches
        Branches after the branch point (at least 1).
    branch_time
        Time of the branch point, in [0, 1).
    dynamic_fraction
        Fraction of the genes that follow a program of time.
    program_lfc
        Typical amplitude of a program on the natural-log scale.
    program_width
        Width ``w`` of the programs' sigmoids and bumps, and of the branches' ramp, in time units.
    mean_library, theta
        Typical counts per cell and the negative binomial dispersion.
    seed
        Seed of every random draw: the same seed gives the same counts.

    Returns
    -------
    AnnData with integer counts in ``X`` (CSR float32), ``obs['true_time']`` (float in [0, 1]),
    ``obs['branch']`` (categorical: ``trunk``, ``branch_0``, ...), ``var['program']`` (``shared``,
    ``branch_<k>`` or ``none``) and gene names ``SIM00001``... in ``var_names``.
    """
    if n_branches < 1:
        raise InputError(f"n_branches={n_branches}: a trajectory needs at least one branch (1 is linear).")
    if not 0 <= branch_time < 1:
        raise InputError(f"branch_time={branch_time} must be in [0, 1): the time of the branch point.")
    rng = np.random.default_rng(seed)
    time = rng.uniform(0.0, 1.0, size=n_cells)
    branch = np.where(time < branch_time, -1, rng.integers(0, n_branches, size=n_cells))  # -1: trunk
    base = rng.normal(-1.0, 1.5, size=n_genes)
    program_of_gene = gene_programs(n_genes, n_branches, dynamic_fraction, rng)  # -2 none, -1 shared, k branch
    shapes = rng.integers(0, 3, size=n_genes)
    centres = np.where(program_of_gene == -1, rng.uniform(0.0, 1.0, size=n_genes),
                       rng.uniform(branch_time, 1.0, size=n_genes))
    amplitude = program_lfc * rng.uniform(0.5, 1.5, size=n_genes)
    effect = amplitude * program_values(time, centres, shapes, program_width)  # (cells, genes)
    ramp = smoothstep((time - branch_time) / program_width)  # (cells,)
    active = (program_of_gene[None] == -1) | (program_of_gene[None] == branch[:, None])  # (cells, genes)
    gate = np.where(program_of_gene[None] == -1, 1.0, ramp[:, None])
    logits = base[None] + np.where(active, effect * gate, 0.0)  # (cells, genes)
    counts = negative_binomial_counts(logits, mean_library, theta, rng)
    branch_names = ["trunk", *(f"branch_{k}" for k in range(n_branches))]
    program_names = np.array(["none", "shared", *(f"branch_{k}" for k in range(n_branches))])
    return ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame(
            {"true_time": time, "branch": pd.Categorical.from_codes(branch + 1, categories=branch_names)},
            index=[f"cell{i:06d}" for i in range(n_cells)],
        ),
        var=pd.DataFrame({"program": pd.Categorical(program_names[program_of_gene + 2])},
                         index=[f"SIM{g + 1:05d}" for g in range(n_genes)]),
    )


def gene_programs(n_genes: int, n_branches: int, dynamic_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Each gene's program: -2 none, -1 shared by every cell, k >= 0 the program of branch k."""
    program = np.full(n_genes, -2)
    dynamic = rng.permutation(n_genes)[: int(round(dynamic_fraction * n_genes))]
    n_shared = len(dynamic) // 2
    program[dynamic[:n_shared]] = -1
    program[dynamic[n_shared:]] = np.arange(len(dynamic) - n_shared) % n_branches
    return program


def program_values(time: np.ndarray, centres: np.ndarray, shapes: np.ndarray, width: float) -> np.ndarray:
    """(cells, genes) values in [0, 1] of each gene's program at each cell's time: shape 0 a rising sigmoid,
    1 a falling sigmoid, 2 a transient bump, each centred at the gene's centre."""
    offset = (time[:, None] - centres[None]) / width  # (cells, genes)
    rising = 1.0 / (1.0 + np.exp(-offset))
    return np.select([shapes[None] == 0, shapes[None] == 1], [rising, 1.0 - rising], np.exp(-0.5 * offset**2))


def smoothstep(x: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, and ``3x^2 - 2x^3`` between: a ramp with no kink at either end."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)
