"""Where data enters atlasformer: reading AnnData files in chunks and checking that they hold counts.

Every check raises :class:`InputError` with a message that names the problem and the fix. Input
files are opened read-only (backed mode for h5ad), so they are never modified.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


class InputError(ValueError):
    """Input data that atlasformer cannot use as given; the message says how to fix it."""


@dataclass(frozen=True)
class CountChunk:
    """A block of consecutive cells of one file."""

    start: int
    """Index of the first cell of the block within its file."""
    counts: sp.csr_matrix
    """(cells, genes) raw counts, float32 CSR."""
    obs: pd.DataFrame
    """The cells' obs rows."""


def expand_data_paths(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand ``--data`` arguments: h5ad files, and folders searched (sorted) for ``*.h5ad``."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(path.rglob("*.h5ad"))
            if not found:
                raise InputError(f"{path}: folder holds no .h5ad files; pass h5ad files or a folder of them.")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or folder; check the --data path.")
    return files


def read_h5ad(path: str | os.PathLike, backed: bool = True) -> ad.AnnData:
    """Open an h5ad file read-only (backed by default), naming the file if it is corrupt."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file; check the path.")
    try:
        adata = ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as err:  # h5py/anndata raise many types for a damaged file
        raise InputError(
            f"{path}: cannot be read as h5ad ({type(err).__name__}: {err}). The file is truncated or "
            "corrupt; re-export it (adata.write_h5ad) or remove it from --data."
        ) from err
    require_cells_and_genes(adata, source=str(path))
    return adata


def require_cells_and_genes(adata: ad.AnnData, *, source: str = "data", need_cells: bool = True) -> None:
    """Raise :class:`InputError` for an AnnData with no cells (when ``need_cells``) or no genes."""
    if need_cells and adata.n_obs == 0:
        raise InputError(f"{source}: holds 0 cells ({adata.n_vars:,} genes); there is nothing to process. Check "
                         "that the file was written after filtering, or remove it from --data.")
    if adata.n_vars == 0:
        raise InputError(f"{source}: holds {adata.n_obs:,} cells but 0 genes (var is empty); the count matrix is "
                         "missing. Re-export the file with its genes, or remove it from --data.")


def count_matrix(adata: ad.AnnData, layer: str | None = None):
    """Return ``adata.X`` or ``adata.layers[layer]``, with a clear error for a missing layer."""
    if layer is None:
        if adata.X is None:
            raise InputError("adata.X is empty; pass the layer holding raw counts, e.g. layer='counts'.")
        return adata.X
    if layer not in adata.layers:
        raise InputError(
            f"layer {layer!r} not found; available layers: {sorted(adata.layers.keys()) or 'none'}. "
            "Pass the layer that holds raw counts, or omit it to use X."
        )
    return adata.layers[layer]


def to_csr(block) -> sp.csr_matrix:
    """Any backed or in-memory 2-D block to a float32 CSR matrix."""
    if hasattr(block, "to_memory"):
        block = block.to_memory()
    if sp.issparse(block):
        return sp.csr_matrix(block, dtype=np.float32)
    return sp.csr_matrix(np.asarray(block, dtype=np.float32))


def check_counts(counts: sp.csr_matrix, *, source: str, layer: str | None = None) -> None:
    """Raise :class:`InputError` unless ``counts`` holds raw counts.

    Checks for NaN/inf, negative values, an empty matrix, and non-integer values (log-normalised or
    scaled data where raw counts are needed).
    """
    where = f"{source} ({'X' if layer is None else f'layer {layer!r}'})"
    if counts.shape[0] == 0 or counts.shape[1] == 0:
        raise InputError(f"{where}: the matrix is empty ({counts.shape[0]} cells x {counts.shape[1]} genes).")
    values = counts.data
    if values.size == 0:
        raise InputError(f"{where}: every value is zero; the file holds no counts.")
    if not np.isfinite(values.sum(dtype=np.float64)) and not np.all(np.isfinite(values)):  # cheap sum first
        n_bad = int((~np.isfinite(values)).sum())
        raise InputError(f"{where}: {n_bad} NaN or infinite values; atlasformer needs finite raw counts.")
    if values.min() < 0:
        raise InputError(
            f"{where}: negative values (min {values.min():.3g}); this looks scaled or centred. "
            "Pass raw counts, e.g. layer='counts'."
        )
    # exact integers (the common case) are checked in one cheap pass; near-integers within atol pass too
    if not np.array_equal(values, np.rint(values)) and not np.allclose(values, np.round(values), atol=1e-3):
        hint = " Available layers could hold them: pass layer='counts'." if layer is None else ""
        raise InputError(
            f"{where}: values are not integer counts (e.g. {values[np.argmax(np.abs(values - np.round(values)))]:.4g});"
            f" this looks log-normalised or scaled. atlasformer needs raw counts.{hint}"
        )


def check_obs_key(obs: pd.DataFrame, key: str | None, *, source: str, what: str = "labels_key") -> None:
    """Raise :class:`InputError` when ``key`` is not an obs column."""
    if key is not None and key not in obs.columns:
        raise InputError(
            f"{source}: {what}={key!r} is not a column of obs; available: {list(obs.columns)}. "
            f"Pass the obs column that holds it (--{what.replace('_', '-')})."
        )


def iter_count_chunks(
    adata: ad.AnnData, *, layer: str | None = None, chunk_size: int = 2048, source: str = "data"
) -> Iterator[CountChunk]:
    """Yield consecutive blocks of cells as checked float32 CSR counts.

    Works on backed AnnData, so memory is bounded by ``chunk_size`` rather than the file.
    """
    n_cells = adata.n_obs
    if n_cells == 0:
        raise InputError(f"{source}: the file holds no cells.")
    for start in range(0, n_cells, chunk_size):
        stop = min(start + chunk_size, n_cells)
        block = count_matrix(adata, layer)[start:stop]
        counts = to_csr(block)
        check_counts(counts, source=f"{source} cells {start}-{stop}", layer=layer)
        yield CountChunk(start=start, counts=counts, obs=adata.obs.iloc[start:stop])
