"""Cell search over a reference: the k nearest reference cells of each query cell, by cosine similarity.

The SCimilarity use case: embed a reference atlas once, index it, then look up any query cell's most similar
reference cells and their annotations. :func:`build_index` indexes ``obsm['X_atlasformer']`` of a reference
AnnData with the reference ``obs`` columns to report; :func:`search_index` returns one row per query cell and
rank.

Search uses faiss (benchmarks/results/index_search.md compares libraries and index types on 1M cells): an
inverted-file index (``IndexIVFFlat``: k-means lists of the L2-normalised embeddings, inner product, the
``nprobe`` lists nearest a query scanned exactly) from :data:`EXACT_BELOW` reference cells on, exact
brute-force search (``IndexFlatIP``) below, where an approximate index saves nothing. IVF was chosen over HNSW
graphs because it kept finding the true neighbours of query cells unlike any reference cell (a cell type the
atlas lacks: 0.99 of them, where HNSW found 0.29, or 0.58 at six times the search effort), and it builds
six times faster.

A saved index is a folder (:meth:`CellIndex.save`, :meth:`CellIndex.load`):

* ``index.faiss``: the faiss index (a binary format; loading it runs no code, unlike a pickle);
* ``obs.parquet``: the reference cells' names (its index) and obs columns, categorical columns preserved;
* ``index.json``: ``format`` (``atlasformer-cell-index``), ``format_version``, ``atlasformer_version``,
  ``library`` and ``library_version``, ``metric``, ``kind``, ``dim``, ``n_cells``, ``parameters``,
  ``embedding_key``, ``provenance`` (the model that made the embedding) and ``files`` (the SHA-256 of each
  file). Loading checks every hash before reading a file.
"""

from __future__ import annotations

import json
import os
import struct
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd

from atlasformer.checkpoints.files import atlasformer_version, atomic_folder, hub_blob_store, sha256
from atlasformer.tokenization.anndata_io import InputError

FORMAT = "atlasformer-cell-index"
FORMAT_VERSION = 1
"""Index-folder format this code writes and the newest it reads."""
INDEX_FILE, OBS_FILE, MANIFEST_FILE = "index.faiss", "obs.parquet", "index.json"
EXACT_BELOW = 20_000
"""References with fewer cells are searched exactly. Brute force costs time in proportion to the reference:
579 queries per CPU-second at 1M cells in benchmarks/results/index_search.md, so about 29,000 at 20,000 cells,
plenty for any query set, with no k-means training and no approximation."""
NPROBE = 32
"""Lists scanned per query. With 4 sqrt(n) lists (4,000 for 1M cells), recall@10 was 0.9994 on 1M simulated cells
at 4,200 queries per CPU-second, and 0.987 for query cells of types the reference lacks (100k cells;
benchmarks/results/index_search.md)."""
MIN_CELLS_PER_LIST = 39
"""faiss's k-means wants at least 39 training points per centroid."""
OUTPUT_COLUMNS = ("query_cell", "rank", "reference_cell", "distance")
FAISS_TYPES = {"ivf": b"IwFl", "exact": b"IxFI"}
"""The faiss index types this module writes, by the four bytes that open their files; nothing else is read."""
METRIC_INNER_PRODUCT = 0
EMBEDDING_COMMANDS = {
    "X_atlasformer": "`atlasformer embed --data FILE --model MODEL --output DIR` (or atlasformer.embed(adata, model))",
    "X_atlasformer_integrated": "`atlasformer predict integration --data FILE --model FINETUNED --output DIR` "
                                "(or atlasformer.finetune.integrate(adata, model))",
}


class CellIndexError(ValueError):
    """A cell-index folder that cannot be loaded as it is; the message says why and what to do."""


def _faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError("cell search needs faiss: pip install faiss-cpu") from err
    return faiss


def _faiss_version() -> str:
    try:
        return version("faiss-cpu")
    except PackageNotFoundError:
        return getattr(_faiss(), "__version__", "unknown")


class CellIndex:
    """Nearest-neighbour search over reference cell embeddings, by cosine distance (1 - cosine similarity).

    Build with :meth:`build` (or :func:`build_index` from an AnnData), search with :meth:`search`, persist
    with :meth:`save` and :meth:`load`.

    Attributes
    ----------
    index
        The faiss index over the L2-normalised reference embeddings.
    obs
        The reference cells' obs (index: cell names), one row per indexed cell, in index order.
    kind
        ``"ivf"`` (approximate: an inverted file of k-means lists) or ``"exact"`` (brute force).
    nprobe
        Lists scanned per query (IVF); larger is slower and more exact.
    parameters, embedding_key, provenance
        As recorded in ``index.json``.
    """

    def __init__(self, index, obs: pd.DataFrame, *, kind: Literal["ivf", "exact"], nprobe: int = NPROBE,
                 parameters: dict | None = None, embedding_key: str | None = None, provenance: dict | None = None):
        self.index, self.obs, self.kind, self.nprobe = index, obs, kind, int(nprobe)
        self.parameters = dict(parameters or {})
        self.embedding_key, self.provenance = embedding_key, dict(provenance or {})

    def __repr__(self) -> str:
        return (f"CellIndex({self.kind}, {self.n_cells:,} cells, dim {self.dim}, "
                f"obs columns {list(self.obs.columns)}, embedding {self.embedding_key!r})")

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def n_cells(self) -> int:
        return int(self.index.ntotal)

    # ------------------------------------------------------------------------------------ build
    @classmethod
    def build(cls, embeddings: np.ndarray, obs: pd.DataFrame, *, kind: Literal["auto", "ivf", "exact"] = "auto",
              nlist: int | None = None, nprobe: int = NPROBE, seed: int = 0, embedding_key: str | None = None,
              provenance: dict | None = None) -> CellIndex:
        """Index ``embeddings`` (n_cells, dim) of the reference cells described by ``obs`` (n_cells rows).

        Parameters
        ----------
        embeddings
            (n_cells, dim) cell embeddings; each row is L2-normalised here (cosine), so none may be all zeros.
        obs
            The reference cells' obs; its index names the cells (``reference_cell`` in search results).
        kind
            ``"auto"``: exact search below :data:`EXACT_BELOW` cells, an IVF index from there on.
        nlist
            IVF lists (k-means centroids); default 4 sqrt(n_cells), at most one per 39 cells.
        nprobe
            Lists scanned per query (more: slower queries, better recall).
        seed
            Seed of the k-means that makes the lists.
        embedding_key, provenance
            Recorded in ``index.json``: the obsm key the embeddings came from and the model that made them.
        """
        vectors = unit_rows(embeddings, what="reference embeddings")  # (n_cells, dim)
        n, dim = vectors.shape
        obs = reference_obs(obs, n)
        if kind == "auto":
            kind = "exact" if n < EXACT_BELOW else "ivf"
        if kind not in FAISS_TYPES:
            raise InputError(f"kind={kind!r}: choose 'auto', 'ivf' or 'exact'.")
        faiss = _faiss()
        if kind == "exact":
            index, parameters = faiss.IndexFlatIP(dim), {}
        else:
            nlist = default_nlist(n) if nlist is None else int(nlist)
            if not 1 <= nlist <= n:
                raise InputError(f"nlist={nlist}: must be between 1 and the number of reference cells ({n:,}).")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = int(seed)
            index.train(vectors)
            parameters = {"nlist": nlist, "kmeans_seed": int(seed)}
        index.add(vectors)
        return cls(index, obs, kind=kind, nprobe=nprobe, parameters=parameters, embedding_key=embedding_key,
                   provenance=provenance)

    # ------------------------------------------------------------------------------------ search
    def search(self, embedding: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest reference cells of each query embedding.

        Parameters
        ----------
        embedding
            (n_queries, dim) query embeddings, or one (dim,) embedding.
        k
            Neighbours per query, at most the number of reference cells.

        Returns
        -------
        indices
            (n_queries, k) int64 row positions in :attr:`obs`, nearest first.
        distances
            (n_queries, k) float32 cosine distances (1 - cosine similarity, 0 to 2), ascending.
        """
        queries = unit_rows(np.atleast_2d(embedding), what="query embeddings")  # (n_queries, dim)
        if queries.shape[1] != self.dim:
            raise InputError(f"query embeddings have width {queries.shape[1]}, the index {self.dim} "
                             f"({self.embedding_key or 'its embedding'}); embed the query with the model that embedded "
                             f"the reference (provenance: {self.provenance.get('model', 'not recorded')}).")
        k = int(k)
        if not 1 <= k <= self.n_cells:
            raise InputError(f"k={k}: must be between 1 and the number of reference cells ({self.n_cells:,}).")
        if self.kind == "ivf":
            self.index.nprobe = min(self.nprobe, self.index.nlist)
        similarity, indices = self.index.search(queries, k)  # (n_queries, k) each
        missing = np.flatnonzero((indices < 0).any(axis=1))
        if missing.size and self.kind == "ivf":  # the lists scanned held fewer than k cells: scan all (exact)
            self.index.nprobe = self.index.nlist
            similarity[missing], indices[missing] = self.index.search(queries[missing], k)
        return indices.astype(np.int64), (1.0 - similarity).astype(np.float32)

    # ------------------------------------------------------------------------------------ files
    def save(self, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the index folder (``index.faiss``, ``obs.parquet``, ``index.json``) in one rename.

        The folder is written beside ``folder`` and renamed into place, so a crash never leaves half an index.
        An existing non-empty ``folder`` is refused unless ``overwrite``, and even then replaced only when it is
        a cell index (every file listed in its ``index.json``): files atlasformer did not write are never deleted.
        """
        folder = Path(folder)
        refuse_replacing(folder, overwrite=overwrite)
        faiss = _faiss()
        with atomic_folder(folder, overwrite=True) as tmp:
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            write_obs(self.obs, tmp / OBS_FILE)
            manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION, "atlasformer_version": atlasformer_version(),
                "library": "faiss-cpu", "library_version": _faiss_version(), "metric": "cosine", "kind": self.kind,
                "dim": self.dim, "n_cells": self.n_cells, "parameters": {**self.parameters, "nprobe": self.nprobe},
                "embedding_key": self.embedding_key, "provenance": self.provenance,
                "files": {name: sha256(tmp / name) for name in (INDEX_FILE, OBS_FILE)},
            }
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> CellIndex:
        """Read an index folder written by :meth:`save`, after checking its manifest and every file's SHA-256.

        Raises
        ------
        CellIndexError
            The folder is not a cell index (no or a foreign ``index.json``), is of a newer format, or a file is
            missing, altered, not of the kind the manifest says, or not a regular file inside the folder.
        """
        folder = Path(folder)
        manifest = read_index_manifest(folder)
        paths = verified_files(folder, manifest)
        index = read_faiss_index(paths[INDEX_FILE], manifest)
        obs = pd.read_parquet(paths[OBS_FILE])
        if len(obs) != manifest["n_cells"]:
            raise CellIndexError(f"{folder}: {OBS_FILE} has {len(obs):,} rows for {manifest['n_cells']:,} indexed cells; "
                                 "rebuild the index.")
        parameters = dict(manifest.get("parameters") or {})
        return cls(index, obs, kind=manifest["kind"], nprobe=parameters.pop("nprobe", NPROBE),
                   parameters=parameters, embedding_key=manifest.get("embedding_key"),
                   provenance=manifest.get("provenance"))


# ---------------------------------------------------------------------------------------- AnnData API
def build_index(adata: ad.AnnData, *, use_rep: str = "X_atlasformer", obs_keys: list[str] | None = None,
                provenance: dict | None = None, kind: Literal["auto", "ivf", "exact"] = "auto",
                nprobe: int = NPROBE) -> CellIndex:
    """Index the reference cells of ``adata`` by their embedding ``obsm[use_rep]``.

    Parameters
    ----------
    adata
        The reference; ``obs_names`` name its cells in search results.
    use_rep
        The obsm key holding the embedding (``X_atlasformer`` from ``atlasformer embed``).
    obs_keys
        The obs columns to keep and report with each neighbour (cell type, donor...); default: all.
    provenance
        The model that made the embedding, for ``index.json``; default: ``uns['atlasformer']['obsm'][use_rep]``
        when the embedding was written by atlasformer, else empty.
    kind, nprobe
        See :meth:`CellIndex.build`.

    Returns
    -------
    The :class:`CellIndex` (``.save(folder)`` to keep it).
    """
    embeddings = obsm_embedding(adata, use_rep, role="reference")
    keys = list(adata.obs.columns) if obs_keys is None else list(obs_keys)
    missing = [key for key in keys if key not in adata.obs.columns]
    if missing:
        raise InputError(f"obs_keys {missing} are not obs columns of the reference; available: "
                         f"{list(adata.obs.columns)}.")
    if provenance is None:
        provenance = dict(adata.uns.get("atlasformer", {}).get("obsm", {}).get(use_rep, {}))
    return CellIndex.build(embeddings, adata.obs[keys], kind=kind, nprobe=nprobe, embedding_key=use_rep,
                           provenance=provenance)


def search_index(index: CellIndex | str | os.PathLike, adata: ad.AnnData, *, use_rep: str = "X_atlasformer",
                 k: int = 10) -> pd.DataFrame:
    """The ``k`` nearest reference cells of every query cell in ``adata``, as a long table.

    Parameters
    ----------
    index
        A :class:`CellIndex`, or the folder of a saved one.
    adata
        The query cells, embedded by the same model as the reference.
    use_rep
        The obsm key holding the query embedding.
    k
        Neighbours per query cell.

    Returns
    -------
    One row per query cell and rank (``n_obs * k`` rows, query cells in ``adata`` order): ``query_cell``
    (obs name), ``rank`` (1 = nearest), ``reference_cell`` (the reference's obs name), ``distance`` (cosine
    distance, 1 - cosine similarity), then the reference obs columns kept in the index (categories preserved).
    ``adata`` is not modified.
    """
    if not isinstance(index, CellIndex):
        index = CellIndex.load(index)
    embedding = obsm_embedding(adata, use_rep, role="query")
    indices, distances = index.search(embedding, k=k)  # (n_queries, k) each
    n_queries, k = indices.shape
    neighbours = index.obs.iloc[indices.ravel()]
    table = pd.DataFrame({
        "query_cell": np.repeat(np.asarray(adata.obs_names, dtype=object), k),
        "rank": np.tile(np.arange(1, k + 1), n_queries),
        "reference_cell": np.asarray(neighbours.index, dtype=object),
        "distance": distances.ravel(),
    })
    columns = neighbours.reset_index(drop=True)
    return pd.concat([table, columns], axis=1)


# ---------------------------------------------------------------------------------------- checks
def default_nlist(n_cells: int) -> int:
    """4 sqrt(n) lists (faiss's guideline is 4 to 16 sqrt(n)), with enough cells per list to train k-means."""
    return max(1, min(int(4 * np.sqrt(n_cells)), n_cells // MIN_CELLS_PER_LIST))


def obsm_embedding(adata: ad.AnnData, key: str, *, role: str) -> np.ndarray:
    """``adata.obsm[key]`` as an array, or an error naming the command that writes it."""
    if key not in adata.obsm:
        writer = EMBEDDING_COMMANDS.get(key, "the command or function that produced it")
        raise InputError(f"the {role} has no obsm[{key!r}] (obsm keys: {list(adata.obsm.keys())}); write it with "
                         f"{writer}, or pass use_rep= the key holding the embedding.")
    value = adata.obsm[key]
    return value.to_numpy() if isinstance(value, pd.DataFrame) else np.asarray(value)


def unit_rows(embeddings, *, what: str) -> np.ndarray:
    """(n, d) float32 C-contiguous copy of ``embeddings`` with every row scaled to length 1."""
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"{what}: expected a non-empty (cells, dimensions) array, got shape {x.shape}.")
    if not np.issubdtype(x.dtype, np.number):
        raise InputError(f"{what}: expected numbers, got dtype {x.dtype}.")
    x = np.array(x, dtype=np.float32, order="C")
    norms = np.linalg.norm(x, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if bad.size:
        raise InputError(f"{what}: {bad.size} row(s) are all zeros or hold NaN/inf (first at row {bad[0]}); cosine "
                         "search needs a direction for every cell: drop those cells or re-embed them.")
    x /= norms[:, None]
    return x


def reference_obs(obs: pd.DataFrame, n_cells: int) -> pd.DataFrame:
    """A copy of ``obs`` fit to store: one row per cell, string names, no column clashing with search output."""
    if not isinstance(obs, pd.DataFrame) or len(obs) != n_cells:
        raise InputError(f"obs must be a DataFrame with one row per reference cell ({n_cells:,}); got "
                         f"{len(obs) if isinstance(obs, pd.DataFrame) else type(obs).__name__}.")
    clashes = [c for c in obs.columns if str(c) in OUTPUT_COLUMNS]
    if clashes:
        raise InputError(f"obs columns {clashes} clash with search_index's own columns {list(OUTPUT_COLUMNS)}; "
                         "rename them, or leave them out with obs_keys=.")
    obs = obs.copy()
    obs.index = obs.index.astype(str)
    obs.columns = [str(c) for c in obs.columns]
    return obs


def write_obs(obs: pd.DataFrame, path: Path) -> None:
    try:
        obs.to_parquet(path, index=True)
    except (TypeError, ValueError) as err:  # pyarrow's errors for mixed-type object columns subclass these
        raise InputError(f"the reference obs cannot be stored as parquet ({err}); convert mixed-type columns with "
                         ".astype(str), or leave them out with obs_keys=.") from err


# ---------------------------------------------------------------------------------------- folder I/O
def refuse_replacing(folder: Path, *, overwrite: bool) -> None:
    """Raise :class:`InputError` unless ``folder`` is absent or empty, or (``overwrite``) a cell index."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: is a file; a cell index is saved into a folder: choose a folder path.")
    present = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.is_dir() else []
    if not present:
        return
    if not overwrite:
        raise InputError(f"{folder}: already exists and is not empty; choose a new folder, or pass overwrite=True to "
                         "replace a cell index saved there.")
    try:
        listed = set(json.loads((folder / MANIFEST_FILE).read_text()).get("files", {})) | {MANIFEST_FILE}
    except (OSError, ValueError, AttributeError):
        listed = set()
    foreign = [name for name in present if name not in listed]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise InputError(f"{folder}: holds files that are not part of a cell index ({shown}), which replacing it would "
                         "delete; choose another folder, or move those files away.")


def read_index_manifest(folder: Path) -> dict:
    """``index.json`` of a cell-index folder, checked for format, version and the fields loading needs."""
    fix = "rebuild the index (build_index(...).save(folder)) or re-download it"
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise CellIndexError(f"{folder}: not a folder; a cell index is a folder written by CellIndex.save.")
    if not path.is_file():
        raise CellIndexError(f"{folder}: has no {MANIFEST_FILE}, so it is not a cell index folder; {fix}.")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CellIndexError(f"{path}: not valid JSON ({err}); {fix}.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CellIndexError(f"{path}: not an atlasformer cell index manifest (no \"format\": \"{FORMAT}\"); this "
                             f"folder was written by something else. {fix[0].upper() + fix[1:]}.")
    if not isinstance(manifest.get("format_version"), int) or manifest["format_version"] > FORMAT_VERSION:
        raise CellIndexError(f"{folder}: cell index format {manifest.get('format_version')!r} (atlasformer "
                             f"{manifest.get('atlasformer_version')}); this atlasformer reads format <= {FORMAT_VERSION}. "
                             "Upgrade: pip install -U atlasformer.")
    files = manifest.get("files")
    problems = [f"'files' must list exactly {INDEX_FILE} and {OBS_FILE}"] if (
        not isinstance(files, dict) or set(files) != {INDEX_FILE, OBS_FILE}) else []
    if manifest.get("kind") not in FAISS_TYPES:
        problems.append(f"'kind' must be one of {sorted(FAISS_TYPES)}")
    for field in ("dim", "n_cells"):
        if not isinstance(manifest.get(field), int) or manifest[field] < 1:
            problems.append(f"{field!r} must be a positive integer")
    if problems:
        raise CellIndexError(f"{path}: {'; '.join(problems)}; {fix}.")
    return manifest


def verified_files(folder: Path, manifest: dict) -> dict[str, Path]:
    """The folder's files by name, each a regular file inside the folder whose SHA-256 matches the manifest."""
    blob_store = hub_blob_store(folder)  # a huggingface_hub snapshot's files are symlinks into its blobs/
    paths = {}
    for name, expected in manifest["files"].items():
        path = folder / name
        target = path.resolve() if path.exists() else None
        if target is None:
            raise CellIndexError(f"{folder}: {name}, listed in {MANIFEST_FILE}, is missing; re-save or re-download "
                                 "the index.")
        roots = [folder.resolve()] + ([blob_store] if blob_store is not None else [])
        if not any(target == root or root in target.parents for root in roots) or not target.is_file():
            raise CellIndexError(f"{folder}: {name} is not a regular file inside the folder (it resolves to "
                                 f"{target}); re-save or re-download the index.")
        if sha256(target) != expected:
            raise CellIndexError(f"{folder}: {name} does not match its SHA-256 in {MANIFEST_FILE}; the file is "
                                 "corrupt or was altered: rebuild the index or re-download it.")
        paths[name] = target
    return paths


def read_faiss_index(path: Path, manifest: dict):
    """The faiss index in ``path``, read only when its header is the kind, width and size the manifest says."""
    with open(path, "rb") as fh:
        header = fh.read(37)  # fourcc, d (int32), ntotal (int64), two unused int64, is_trained (bool), metric (int32)
    fourcc, dim, ntotal, metric = (header[:4], *struct.unpack("<iq", header[4:16]),
                                   struct.unpack("<i", header[33:37])[0]) if len(header) == 37 else (b"", 0, 0, -1)
    expected = (FAISS_TYPES[manifest["kind"]], manifest["dim"], manifest["n_cells"], METRIC_INNER_PRODUCT)
    if (fourcc, dim, ntotal, metric) != expected:
        raise CellIndexError(f"{path}: holds a faiss index of type {fourcc!r}, width {dim}, {ntotal} vectors and metric "
                             f"{metric}; {MANIFEST_FILE} says {expected[0]!r}, {expected[1]}, {expected[2]}, "
                             f"{expected[3]} (inner product); rebuild the index.")
    faiss = _faiss()
    with deserialization_limit(faiss, path.stat().st_size):
        try:
            return faiss.read_index(str(path))
        except RuntimeError as err:
            raise CellIndexError(f"{path}: faiss cannot read it ({str(err).splitlines()[0]}); rebuild the index.") from err


@contextmanager
def deserialization_limit(faiss, n_bytes: int):
    """While reading, no array in the file may claim more bytes than the whole file holds (a crafted header
    cannot make faiss allocate more). faiss releases without this setting read without the cap."""
    if not hasattr(faiss, "set_deserialization_vector_byte_limit"):
        yield
        return
    previous = faiss.get_deserialization_vector_byte_limit()
    faiss.set_deserialization_vector_byte_limit(int(n_bytes))
    try:
        yield
    finally:
        faiss.set_deserialization_vector_byte_limit(previous)
