"""The corpus format on disk: shard files written atomically, the manifest, and the memory-mapped reader.

See :mod:`.corpus` for the folder layout and docs/corpus.md for every manifest field.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from .anndata_io import InputError
from .outputs import atomic_path
from .tokenizer import CellTokenizer, TokenizedCells

MANIFEST = "manifest.json"
FORMAT = "atlasformer-corpus"
FORMAT_VERSION = 1
ARRAY_FILES = ("offsets.npy", "gene_ids.npy", "values.npy")
OBS_FILE = "obs.parquet"
SHARD_FILES = (*ARRAY_FILES, OBS_FILE)


# ----------------------------------------------------------------------------------------- files
def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data, *, default=str) -> None:
    """Write JSON to a temporary file, flush it to disk and rename it over ``path``, so a reader never sees half a
    file; ``default`` converts what JSON cannot hold (``float`` for numpy numbers, ``str`` for paths)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, default=default)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(path.parent)


class NpyAppender:
    """A 1-D ``.npy`` file grown by appending; numpy pads headers so the final length fits in place."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.n = path, np.dtype(dtype), 0
        self.fh = open(path, "wb")
        self.header_len = self._write_header()

    def _write_header(self) -> int:
        self.fh.seek(0)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.n,)}
        np.lib.format.write_array_header_1_0(self.fh, header)
        return self.fh.tell()

    def append(self, array: np.ndarray) -> None:
        self.fh.write(np.ascontiguousarray(array, dtype=self.dtype).tobytes())
        self.n += len(array)

    def close(self) -> None:
        end = self.fh.tell()
        if self._write_header() != self.header_len:
            raise RuntimeError(f"{self.path}: npy header grew while appending")
        self.fh.seek(end)
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


def storage_dtypes(tokenizer: CellTokenizer) -> dict[str, str]:
    """Smallest exact on-disk dtypes: uint16 gene ids for vocabularies up to 65,536 tokens, integer bins."""
    cfg = tokenizer.config
    values = ("uint8" if cfg.n_bins <= 256 else "uint16") if cfg.kind == "binned" else "float32"
    return {"gene_ids": "uint16" if len(tokenizer.vocab) <= 65536 else "int32", "values": values}


class ShardWriter:
    """Writes one shard under ``.tmp-<name>`` chunk by chunk; :meth:`commit` makes it ``<name>`` atomically."""

    def __init__(self, root: Path, name: str, dtypes: dict[str, str]):
        self.root, self.name = root, name
        self.tmp = root / f".tmp-{name}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.gene_ids = NpyAppender(self.tmp / "gene_ids.npy", dtypes["gene_ids"])
        self.values = NpyAppender(self.tmp / "values.npy", dtypes["values"])
        self.lengths: list[np.ndarray] = []
        self.obs: list[pd.DataFrame] = []
        self.n_empty_dropped = 0

    def add(self, cells: TokenizedCells, obs: pd.DataFrame) -> None:
        self.gene_ids.append(cells.gene_ids)
        values = cells.values if self.values.dtype.kind == "f" else np.rint(cells.values)
        self.values.append(values)
        self.lengths.append(cells.lengths)
        self.obs.append(obs)
        self.n_empty_dropped += cells.n_empty_dropped

    def commit(self) -> dict:
        """Flush every file, rename the folder into place; returns the shard's manifest record."""
        self.gene_ids.close()
        self.values.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(self.tmp / "offsets.npy", offsets)
        obs = pd.concat(self.obs, ignore_index=True) if self.obs else pd.DataFrame()
        obs.to_parquet(self.tmp / OBS_FILE, index=False)
        files = {}
        for name in SHARD_FILES:
            path = self.tmp / name
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        final = self.root / self.name
        shutil.rmtree(final, ignore_errors=True)
        self.tmp.rename(final)
        _fsync_dir(self.root)
        return {"name": self.name, "n_cells": int(len(lengths)), "n_tokens": int(offsets[-1]),
                "n_empty_dropped": self.n_empty_dropped, "files": files}

    def abort(self) -> None:
        for appender in (self.gene_ids, self.values):
            if not appender.fh.closed:
                appender.fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------- manifest
def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the corpus at ``path``; :class:`InputError` when it is missing or not a corpus."""
    file = Path(path) / MANIFEST
    if not file.exists():
        raise InputError(f"{path}: no {MANIFEST}; this is not a corpus folder (build one with `atlasformer tokenize`).")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{file}: not valid JSON ({err}); rebuild the corpus.") from err
    if manifest.get("format") != FORMAT:
        raise InputError(f"{file}: not an atlasformer corpus manifest.")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(f"{file}: corpus format {manifest['format_version']} is newer than this atlasformer reads "
                         f"({FORMAT_VERSION}); upgrade atlasformer.")
    return manifest


def is_corpus(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a corpus manifest."""
    try:
        read_manifest(path)
    except InputError:
        return False
    return True




# ----------------------------------------------------------------------------------------- reading
class Corpus:
    """A built corpus, read memory-mapped: shards of ragged token arrays, per-cell metadata, its tokenizer.

    Cells are numbered globally in shard order (``shard_starts[i] + row``). Arrays are opened lazily
    and never pickled, so the object is cheap to send to DataLoader workers.

    Parameters
    ----------
    path
        The corpus folder (holding ``manifest.json``).
    verify
        Check every file's SHA-256 against the manifest (reads the whole corpus once).

    Without ``verify``, damage is still caught before it can reach training: file sizes are checked
    here, a shard's arrays when it is first opened (readable headers, the stored dtypes, offsets that
    start at 0, never decrease and end at the token count), and every cell read (gene ids inside the
    vocabulary, values inside the tokenizer's range). Each raises :class:`InputError` naming the shard.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = False):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest["complete"]:
            raise InputError(f"{self.path}: the corpus build did not finish; rerun the same `atlasformer tokenize` "
                             "command to complete it (it resumes).")
        self.shards: list[dict] = self.manifest["shards"]
        self.shard_starts = np.zeros(len(self.shards) + 1, dtype=np.int64)
        np.cumsum([s["n_cells"] for s in self.shards], out=self.shard_starts[1:])
        for i, shard in enumerate(self.shards):
            for name, info in shard["files"].items():
                file = self.path / shard["name"] / name
                if not file.exists() or file.stat().st_size != info["bytes"]:
                    raise self.damaged(i, f"{name} is missing or of the wrong size")
        if verify:
            self.verify()
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._tokenizer: CellTokenizer | None = None

    def __len__(self) -> int:
        return int(self.shard_starts[-1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}}  # memory maps are reopened, never copied, in workers

    @property
    def tokenizer(self) -> CellTokenizer:
        if self._tokenizer is None:
            self._tokenizer = CellTokenizer.load(self.path)
        return self._tokenizer

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    def verify(self) -> None:
        """Raise :class:`InputError` naming the first file whose SHA-256 differs from the manifest's."""
        for i, shard in enumerate(self.shards):
            for name, info in shard["files"].items():
                if sha256_file(self.path / shard["name"] / name) != info["sha256"]:
                    raise self.damaged(i, f"{name} does not match its SHA-256 (checksum mismatch)")

    def damaged(self, shard: int, problem: str) -> InputError:
        """The error for a damaged shard: which one, what is wrong, how to rebuild the corpus."""
        return InputError(f"{self.path / self.shards[shard]['name']}: corpus shard is damaged ({problem}); rebuild it: "
                          "rerun the same `atlasformer tokenize` command, which rewrites damaged shards.")

    def arrays(self, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(offsets, gene_ids, values)`` of one shard, memory-mapped read-only, checked on first use."""
        if shard not in self._arrays:
            self._arrays[shard] = self._open_arrays(shard)
        return self._arrays[shard]

    def _open_arrays(self, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Memory-map one shard's arrays and check their layout (reads only the small offsets array)."""
        folder = self.path / self.shards[shard]["name"]
        arrays = []
        for name in ARRAY_FILES:
            try:
                arrays.append(np.load(folder / name, mmap_mode="r"))
            except (OSError, ValueError, EOFError) as err:  # a damaged .npy header
                raise self.damaged(shard, f"{name} is unreadable: {err}") from err
        problem = shard_layout_problem(*arrays, self.shards[shard], self.manifest["dtypes"])
        if problem:
            raise self.damaged(shard, problem)
        return tuple(arrays)

    def _check_tokens(self, shard: int, gene_ids: np.ndarray, values: np.ndarray) -> None:
        """Refuse cells whose tokens a model could not embed: ids outside the vocabulary, values outside the bins."""
        problem = token_problem(gene_ids, values, self.manifest)
        if problem:
            raise self.damaged(shard, problem)

    def lengths(self, shard: int) -> np.ndarray:
        """(cells,) tokens per cell of one shard."""
        return np.diff(self.arrays(shard)[0])

    def read(self, shard: int, start: int, stop: int) -> TokenizedCells:
        """Cells ``start:stop`` of one shard copied into memory; ``cell_index`` holds global cell ids."""
        offsets, gene_ids, values = self.arrays(shard)
        offsets = np.array(offsets[start : stop + 1])
        lo, hi = offsets[0], offsets[-1]
        gene_ids, values = np.array(gene_ids[lo:hi]), np.array(values[lo:hi])
        self._check_tokens(shard, gene_ids, values)
        return TokenizedCells(offsets - lo, gene_ids, values, np.arange(start, stop, dtype=np.int64) + self.shard_starts[shard])

    def read_blocks(self, blocks: np.ndarray) -> TokenizedCells:
        """Cells of ``(shard, start, stop)`` blocks, in order, copied once from the memory maps into one buffer."""
        spans = []  # (shard, gene_ids map, values map, token start, token stop) per block
        offsets_parts, cell_index = [], []
        for shard, start, stop in np.asarray(blocks, dtype=np.int64).tolist():
            offsets, gene_ids, values = self.arrays(shard)
            local = np.asarray(offsets[start : stop + 1])
            spans.append((shard, gene_ids, values, int(local[0]), int(local[-1])))
            offsets_parts.append(np.diff(local))
            cell_index.append(np.arange(start, stop, dtype=np.int64) + self.shard_starts[shard])
        lengths = np.concatenate(offsets_parts) if spans else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gene_dtype, value_dtype = (self.manifest["dtypes"][k] for k in ("gene_ids", "values"))
        gene_ids, values = np.empty(offsets[-1], dtype=gene_dtype), np.empty(offsets[-1], dtype=value_dtype)
        position = 0
        for shard, genes_map, values_map, lo, hi in spans:
            gene_ids[position : position + hi - lo] = genes_map[lo:hi]
            values[position : position + hi - lo] = values_map[lo:hi]
            self._check_tokens(shard, gene_ids[position : position + hi - lo], values[position : position + hi - lo])
            position += hi - lo
        return TokenizedCells(offsets, gene_ids, values, np.concatenate(cell_index) if spans else np.zeros(0, np.int64))

    def obs(self, shard: int, columns: list[str] | None = None) -> pd.DataFrame:
        """Per-cell metadata of one shard (source, cell_index, obs_name, batch / labels columns)."""
        try:
            obs = pd.read_parquet(self.path / self.shards[shard]["name"] / OBS_FILE, columns=columns)
        except (OSError, ValueError) as err:  # pyarrow's errors for damaged files derive from these
            raise self.damaged(shard, f"{OBS_FILE} is unreadable: {str(err).splitlines()[0] if str(err) else err!r}") from err
        if len(obs) != self.shards[shard]["n_cells"]:
            raise self.damaged(shard, f"{OBS_FILE} holds {len(obs)} rows for {self.shards[shard]['n_cells']} cells")
        return obs

    def source_names(self) -> list[str]:
        """Input names by the ``source`` index stored per cell."""
        return [record["name"] for record in self.manifest["inputs"]]


def shard_layout_problem(offsets: np.ndarray, gene_ids: np.ndarray, values: np.ndarray, record: dict,
                         dtypes: dict) -> str | None:
    """What is wrong with a shard's arrays against its manifest ``record``, or None.

    Cheap: reads only the offsets (one integer per cell), so every process checks each shard it opens.
    """
    n_cells, n_tokens = record["n_cells"], record["n_tokens"]
    for name, array, dtype in (("gene_ids", gene_ids, dtypes["gene_ids"]), ("values", values, dtypes["values"])):
        if array.dtype != np.dtype(dtype) or array.ndim != 1 or len(array) != n_tokens:
            return f"{name}.npy holds {array.shape} {array.dtype}, the manifest says ({n_tokens},) {dtype}"
    if offsets.ndim != 1 or len(offsets) != n_cells + 1:
        return f"offsets.npy holds {offsets.shape} entries for {n_cells} cells"
    offsets = np.asarray(offsets)
    if offsets[0] != 0 or offsets[-1] != n_tokens or (np.diff(offsets) < 0).any():
        return f"offsets.npy does not run from 0 to {n_tokens} tokens without decreasing"
    return None


def token_problem(gene_ids: np.ndarray, values: np.ndarray, manifest: dict) -> str | None:
    """Token ids outside the vocabulary, or values outside the tokenizer's range, or None."""
    vocab_size = manifest["vocab_size"]
    if len(gene_ids) and (int(gene_ids.max()) >= vocab_size or int(gene_ids.min()) < 0):
        bad = int(gene_ids.max()) if int(gene_ids.max()) >= vocab_size else int(gene_ids.min())
        return f"gene id {bad} outside the vocabulary of {vocab_size} tokens"
    if not len(values):
        return None
    if values.dtype.kind == "f":
        return None if np.isfinite(values).all() else "values that are not finite numbers"
    n_bins = manifest.get("settings", {}).get("tokenizer", {}).get("n_bins")
    if n_bins is not None and int(values.max()) >= n_bins:
        return f"value bin {int(values.max())} outside the {n_bins} bins"
    return None


def export_hf_dataset(corpus: Corpus | str | os.PathLike, output: str | os.PathLike) -> Path:
    """Export a rank-value corpus as a Hugging Face dataset with ``input_ids``, as Geneformer reads.

    Columns: ``input_ids`` (gene token ids in descending rank order, without special tokens),
    ``length``, ``source``, ``cell_index``, ``obs_name`` and the corpus's batch / labels columns. The
    tokenizer files are copied beside the dataset. Shards are converted one at a time (memory-mapped
    Arrow), and the folder is written under a temporary name and renamed.

    Returns
    -------
    The dataset folder; open it with ``datasets.load_from_disk``.
    """
    import datasets
    import pyarrow as pa

    corpus = corpus if isinstance(corpus, Corpus) else Corpus(corpus)
    if corpus.manifest["kind"] != "rank":
        raise InputError(f"{corpus.path}: a {corpus.manifest['kind']} corpus; the Geneformer-style export needs "
                         "rank-value input_ids. Build the corpus with tokenizer.kind=rank.")
    output = Path(output)
    if output.exists():
        raise InputError(f"{output} exists; choose a new output folder for the dataset.")
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    parts = tmp / "parts"
    parts.mkdir(parents=True)
    names = np.asarray(corpus.source_names(), dtype=object)
    files = []
    for i in range(len(corpus.shards)):
        offsets, gene_ids, _ = corpus.arrays(i)
        obs = corpus.obs(i)
        columns = {
            "input_ids": pa.ListArray.from_arrays(pa.array(np.asarray(offsets, dtype=np.int32)),
                                                  pa.array(np.asarray(gene_ids, dtype=np.int32))),
            "length": pa.array(np.diff(offsets).astype(np.int32)),
            "source": pa.array(names[obs.pop("source").to_numpy()].astype(str)),
        }
        columns.update({name: pa.array(obs[name].to_numpy()) for name in obs.columns})
        table = pa.table(columns)
        files.append(parts / f"{i:05d}.arrow")
        with pa.OSFile(str(files[-1]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    dataset = datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])
    dataset.save_to_disk(str(tmp / "dataset"))
    del dataset
    for name in ("vocab.json", "tokenizer_config.json", "gene_medians.json"):
        if (corpus.path / name).exists():
            shutil.copy2(corpus.path / name, tmp / "dataset" / name)
    (tmp / "dataset").rename(output)
    shutil.rmtree(tmp)
    return output
