"""The inputs of a corpus build: h5ad files (read backed) and TileDB-SOMA experiments, read in row ranges.

Both kinds offer the same small interface (:class:`CorpusInput`): ``var`` (gene names in the index and
the identifier columns), ``obs_columns``, and ``read(start, stop)`` returning checked raw counts and the
obs rows of cells ``start:stop``. Memory is bounded by the range read, never by the input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .anndata_io import InputError, check_counts, count_matrix, expand_data_paths, read_h5ad, to_csr
from .data import column_totals, input_stem

SOMA_DEFAULT_LAYER = "data"
"""X layer read from a SOMA measurement when no ``layer`` is given (tiledbsoma.io.from_anndata's name for X)."""


@dataclass
class CorpusInput:
    """One input of a corpus build; subclasses read h5ad files or SOMA experiments."""

    path: str
    """The path or URI as given."""
    kind: str = field(init=False, default="")
    n_obs: int = field(init=False, default=0)
    var: pd.DataFrame = field(init=False, repr=False, default=None)
    """Gene names (index) and identifier columns."""

    @property
    def name(self) -> str:
        """File name without ``.h5ad`` / ``.rna`` (the source name in reports and metadata)."""
        return input_stem(self.path.rstrip("/"))

    @property
    def obs_columns(self) -> list[str]:
        raise NotImplementedError

    def read(self, start: int, stop: int, *, layer: str | None = None) -> tuple[sp.csr_matrix, pd.DataFrame]:
        """Checked float32 CSR raw counts and obs rows of cells ``start:stop``."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What identifies this input's content for resuming a build (path, size, modification time)."""
        raise NotImplementedError

    def var_adata(self) -> ad.AnnData:
        """An AnnData holding only ``var``, for gene-ID resolution (which reads nothing else)."""
        return ad.AnnData(var=self.var)

    def gene_counts(self, *, layer: str | None = None, chunk_size: int = 4096) -> np.ndarray:
        """(genes,) float64 total count of each gene, computed range by range."""
        totals = np.zeros(len(self.var), dtype=np.float64)
        for start in range(0, self.n_obs, chunk_size):
            counts, _ = self.read(start, min(start + chunk_size, self.n_obs), layer=layer)
            totals += column_totals(counts)
        self.close()
        return totals

    def close(self) -> None:
        """Release the input's file handles and in-memory tables (reading reopens it)."""


@dataclass
class H5adInput(CorpusInput):
    """An h5ad file opened backed and read-only when read, and closed between uses.

    Backed mode loads a file's whole obs table, so at most one input is open at a time: a build over
    many large files holds one file's obs, not all of them.
    """

    def __post_init__(self):
        self.kind = "h5ad"
        self.adata = None
        adata = self._open()
        self.n_obs, self.var, self._obs_columns = adata.n_obs, adata.var.copy(), list(adata.obs.columns)
        self.close()

    def _open(self) -> ad.AnnData:
        if self.adata is None:
            self.adata = read_h5ad(self.path, backed=True)
        return self.adata

    @property
    def obs_columns(self) -> list[str]:
        return self._obs_columns

    def read(self, start: int, stop: int, *, layer: str | None = None) -> tuple[sp.csr_matrix, pd.DataFrame]:
        adata = self._open()
        try:
            counts = to_csr(count_matrix(adata, layer)[start:stop])
        except InputError:
            raise
        except Exception as err:  # h5py raises OSError, KeyError, ValueError ... for damaged files
            raise InputError(
                f"{self.path}: cannot read cells {start}-{stop} ({type(err).__name__}: {err}). The file is truncated "
                "or corrupt; re-export it (adata.write_h5ad) or remove it from --data."
            ) from err
        check_counts(counts, source=f"{self.path} cells {start}-{stop}", layer=layer)
        return counts, adata.obs.iloc[start:stop]

    def identity(self) -> dict:
        stat = os.stat(self.path)
        return {"path": str(Path(self.path).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def close(self) -> None:
        if self.adata is not None and self.adata.isbacked:
            self.adata.file.close()
        self.adata = None


@dataclass
class SomaInput(CorpusInput):
    """A TileDB-SOMA experiment: one measurement's X layer, cells read by ``soma_joinid`` ranges.

    ``var_names`` are taken from the var column ``var_id_name`` (tiledbsoma.io's ``var_id``), obs names
    from ``obs_id_name``; cells are read in ascending ``soma_joinid`` order.
    """

    measurement: str = "RNA"
    obs_id_name: str = "obs_id"
    var_id_name: str = "var_id"

    def __post_init__(self):
        self.kind = "soma"
        self.experiment = None
        experiment = self._open()
        var = experiment.ms[self.measurement].var.read().concat().to_pandas().sort_values("soma_joinid")
        names = var[self.var_id_name] if self.var_id_name in var else var["soma_joinid"].astype(str)
        self.var_joinids = var["soma_joinid"].to_numpy()
        self.var = var.drop(columns=["soma_joinid"]).set_index(pd.Index(names.astype(str).to_numpy()))
        obs_ids = experiment.obs.read(column_names=["soma_joinid"]).concat()
        self.obs_joinids = np.sort(obs_ids.column("soma_joinid").to_numpy())  # (cells,) 8 bytes per cell
        self.n_obs = len(self.obs_joinids)
        self._obs_columns = [n for n in experiment.obs.schema.names if n != "soma_joinid"]
        self.close()

    def _open(self):
        if self.experiment is None:
            try:
                self.experiment = _tiledbsoma().Experiment.open(self.path)
            except Exception as err:
                raise InputError(f"{self.path}: cannot open as a SOMA experiment ({type(err).__name__}: {err}).") from err
            if self.measurement not in self.experiment.ms:
                raise InputError(f"{self.path}: no measurement {self.measurement!r}; available: "
                                 f"{list(self.experiment.ms.keys())}. Pass soma_measurement=NAME.")
        return self.experiment

    @property
    def obs_columns(self) -> list[str]:
        return self._obs_columns

    def _layer(self, layer: str | None):
        name, ms = layer or SOMA_DEFAULT_LAYER, self._open().ms[self.measurement]
        if name not in ms.X:
            raise InputError(f"{self.path}: X layer {name!r} not in measurement {self.measurement!r}; "
                             f"available: {list(ms.X.keys())}. Pass --layer NAME.")
        return ms.X[name]

    def read(self, start: int, stop: int, *, layer: str | None = None) -> tuple[sp.csr_matrix, pd.DataFrame]:
        joinids = self.obs_joinids[start:stop]
        ids = slice(int(joinids[0]), int(joinids[-1]))  # inclusive, as SOMA coordinates are
        try:
            table = self._layer(layer).read(coords=(ids,)).tables().concat()
            obs = self._open().obs.read(coords=(ids,)).concat().to_pandas()
        except InputError:
            raise
        except Exception as err:
            raise InputError(f"{self.path}: cannot read cells {start}-{stop} ({type(err).__name__}: {err}).") from err
        rows = np.searchsorted(joinids, table.column("soma_dim_0").to_numpy())
        cols = np.searchsorted(self.var_joinids, table.column("soma_dim_1").to_numpy())
        counts = sp.csr_matrix((table.column("soma_data").to_numpy().astype(np.float32), (rows, cols)),
                               shape=(len(joinids), len(self.var)))
        check_counts(counts, source=f"{self.path} cells {start}-{stop}", layer=layer)
        obs = obs.set_index("soma_joinid").reindex(joinids)
        index = obs.pop(self.obs_id_name).astype(str) if self.obs_id_name in obs else pd.Series(joinids.astype(str))
        return counts, obs.set_axis(pd.Index(np.asarray(index)), axis=0)

    def identity(self) -> dict:
        latest = max((p.stat().st_mtime_ns for p in Path(self.path).rglob("*")), default=0)
        return {"path": str(Path(self.path).resolve()), "n_obs": self.n_obs, "n_vars": len(self.var), "mtime_ns": latest}

    def close(self) -> None:
        if self.experiment is not None:
            self.experiment.close()
        self.experiment = None


def _tiledbsoma():
    try:
        import tiledbsoma
    except ImportError as err:
        raise InputError("reading a SOMA experiment needs tiledbsoma: pip install 'atlasformer[soma]'.") from err
    return tiledbsoma


def is_soma_experiment(path: str | os.PathLike) -> bool:
    """A folder holding a TileDB group is taken for a SOMA experiment (checked with tiledbsoma when installed)."""
    path = Path(path)
    if not path.is_dir() or not ((path / "__tiledb_group.tdb").exists() or (path / "__group").is_dir()):
        return False
    try:
        import tiledbsoma
    except ImportError:
        return True  # opening it will explain how to install tiledbsoma
    return bool(tiledbsoma.Experiment.exists(str(path)))


def expand_corpus_paths(paths: list[str | os.PathLike]) -> list[tuple[str, str]]:
    """``--data`` arguments -> ``(kind, path)``: h5ad files, folders of them (sorted), SOMA experiments."""
    found: list[tuple[str, str]] = []
    for raw in paths:
        if is_soma_experiment(raw):
            found.append(("soma", str(raw)))
        else:
            found.extend(("h5ad", str(p)) for p in expand_data_paths([raw]))
    return found


def open_corpus_input(kind: str, path: str, *, soma_measurement: str = "RNA") -> CorpusInput:
    """Open one input read-only (h5ad backed); a damaged file raises :class:`InputError` naming it."""
    if kind == "soma":
        return SomaInput(path, measurement=soma_measurement)
    return H5adInput(path)
