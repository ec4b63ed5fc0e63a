"""Sharded on-disk corpora of tokenized cells: built in chunks from h5ad files or SOMA experiments.

A corpus folder (format in docs/corpus.md)::

    corpus/
      manifest.json                 what the corpus holds; a shard counts only when listed here
      vocab.json, tokenizer_config.json [, gene_medians.json]     its tokenizer (CellTokenizer.load(corpus))
      shard-00000/
        offsets.npy                 (cells + 1,) int64: cell i owns tokens offsets[i]:offsets[i+1]
        gene_ids.npy                (tokens,) uint16 (int32 for vocabularies over 65,536 tokens)
        values.npy                  (tokens,) uint8 / uint16 bins, or float32 (continuous, rank)
        obs.parquet                 per cell: source, cell_index, obs_name, and the batch / labels columns

Arrays are plain ``.npy`` files read memory-mapped (as BioNeMo's SCDL does), so a reader's private
memory does not grow with the corpus. A shard is written under a temporary name, flushed, renamed, and
only then listed (with the SHA-256 of each file) in the manifest, which is itself replaced atomically:
a build killed at any point leaves listed shards that are complete and an unlisted leftover that the
next run deletes. A rerun with the same settings resumes after the last listed shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from .anndata_io import InputError
from .console import progress_bar
from .corpus_format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    OBS_FILE,
    ShardWriter,
    read_manifest,
    sha256_file,
    storage_dtypes,
    write_json_atomic,
)
from .corpus_inputs import CorpusInput, expand_corpus_paths, open_corpus_input
from .data import build_vocab, resolve_genes, vocab_column_ids
from .gene_ids import require_identifiers
from .medians import MedianAccumulator
from .outputs import refuse_output_over_inputs
from .tokenizer import (
    GENE_MEDIANS_FILE,
    TOKENIZER_CONFIG_FILE,
    CellTokenizer,
    TokenizedCells,
    TokenizerConfig,
)
from .vocab import VOCAB_FILE, GeneVocab

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (VOCAB_FILE, TOKENIZER_CONFIG_FILE, GENE_MEDIANS_FILE)


@dataclass(frozen=True)
class CorpusConfig:
    """How ``atlasformer tokenize`` builds a corpus."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer settings (ignored when a model's tokenizer is given with --model)."""
    layer: str | None = None
    """Counts from this layer instead of X (a SOMA X layer name; default 'data')."""
    gene_key: str | None = None
    """var column holding gene identifiers instead of var_names."""
    batch_key: str | None = None
    """obs column stored per cell as the batch (a file without it gets its file name as batch)."""
    labels_key: str | None = None
    """obs column stored per cell as the label (empty for files without it)."""
    chunk_size: int = 2048
    """Cells read and tokenized at a time; memory is bounded by it."""
    shard_size: int = 65536
    """Input rows per shard at most; shards never span two inputs."""
    allow_mixed_species: bool = False
    """Accept inputs of different species in one corpus."""
    on_bad_input: Literal["error", "skip"] = "error"
    """A file that cannot be used (corrupt, no gene identifiers, no overlap): stop, or exclude it and report it."""
    overwrite: bool = False
    """Replace a complete corpus built with other settings in --output."""
    verify_on_resume: bool = True
    """Check the SHA-256 of shards already written before resuming after them."""
    soma_measurement: str = "RNA"
    """Measurement read from SOMA experiments."""

    def __post_init__(self):
        if self.chunk_size < 1 or self.shard_size < 1:
            raise ValueError("chunk_size and shard_size must be positive")


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _shard_ok(root: Path, shard: dict, verify: bool) -> bool:
    for name, info in shard["files"].items():
        path = root / shard["name"] / name
        if not path.exists() or path.stat().st_size != info["bytes"]:
            return False
        if verify and sha256_file(path) != info["sha256"]:
            return False
    return True


def _prepare_output(root: Path, fingerprint: str, config: CorpusConfig, log) -> dict | None:
    """The manifest to resume from (None: start afresh), after cleaning leftovers of a killed build."""
    if root.exists() and (root / MANIFEST).exists():
        old = read_manifest(root)
        if old["fingerprint"] == fingerprint:
            _keep_listed_shards(root, old, config.verify_on_resume, log)
            return old
        if old["complete"] and not config.overwrite:
            raise InputError(f"{root} holds a complete corpus built from other inputs or settings; choose a new "
                             "--output or pass overwrite=true to replace it.")
        log(f"{root}: settings or inputs changed since the unfinished build there; starting afresh.")
        _clear(root)
    elif root.exists():
        # a build killed before its first manifest leaves at most tokenizer files and temporaries
        foreign = [p.name for p in root.iterdir() if p.name not in TOKENIZER_FILES and not p.name.startswith(".")]
        if foreign:
            raise InputError(f"{root} exists and is not a corpus folder (holds {foreign[:3]}); choose a new or "
                             "empty --output.")
        _clear(root)
    root.mkdir(parents=True, exist_ok=True)
    return None


def _clear(root: Path) -> None:
    (root / MANIFEST).unlink(missing_ok=True)  # first: the folder stops being a corpus before shards go
    for path in root.iterdir():
        if path.is_dir() and (path.name.startswith("shard-") or path.name.startswith(".tmp-")):
            shutil.rmtree(path)
        elif path.name in TOKENIZER_FILES or path.name.startswith("."):
            path.unlink()


def _keep_listed_shards(root: Path, manifest: dict, verify: bool, log) -> None:
    """Drop damaged listed shards (and the later ones of their input) and every unlisted shard folder."""
    kept = []
    redo_from: dict[int, int] = {}
    for shard in manifest["shards"]:
        source = shard["input"]
        if source in redo_from or not _shard_ok(root, shard, verify):
            redo_from.setdefault(source, shard["rows"][0])
            continue
        kept.append(shard)
    for source, row in redo_from.items():
        record = manifest["inputs"][source]
        log(f"{record['path']}: shard(s) from row {row} missing or damaged; rewriting them.")
        record.update(status="pending", next_row=row)
    if redo_from:  # a complete corpus with damaged shards is rebuilt, not reported as done
        manifest["complete"] = False
    manifest["shards"] = kept
    listed = {s["name"] for s in kept}
    for path in root.iterdir():
        if path.is_dir() and (path.name.startswith(".tmp-") or (path.name.startswith("shard-") and path.name not in listed)):
            shutil.rmtree(path)
    _recount(manifest)


def _recount(manifest: dict) -> None:
    """Per-input and total counts from the listed shards (the only ones that count)."""
    for i, record in enumerate(manifest["inputs"]):
        shards = [s for s in manifest["shards"] if s["input"] == i]
        record["n_cells_kept"] = sum(s["n_cells"] for s in shards)
        record["n_empty_dropped"] = sum(s["n_empty_dropped"] for s in shards)
        record["shards"] = [s["name"] for s in shards]
    manifest["n_cells"] = sum(s["n_cells"] for s in manifest["shards"])
    manifest["n_tokens"] = sum(s["n_tokens"] for s in manifest["shards"])


# ----------------------------------------------------------------------------------------- building
@dataclass
class _Prepared:
    """An input ready to be written: its reader, gene columns in the vocabulary and report."""

    source: CorpusInput
    column_ids: np.ndarray
    record: dict


def build_corpus(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    tokenizer: CellTokenizer | TokenizerConfig | None = None,
    *,
    config: CorpusConfig | None = None,
    log: Callable[[str], None] = logger.info,
) -> dict:
    """Tokenize h5ad files and SOMA experiments into a sharded corpus folder, resumably.

    Parameters
    ----------
    inputs
        h5ad files, folders of them, and SOMA experiment folders.
    output
        The corpus folder. A folder holding an unfinished build with the same inputs and settings is
        resumed after its last complete shard; with other settings it is restarted.
    tokenizer
        A model's tokenizer (its vocabulary and settings are kept), or settings for a new tokenizer
        whose vocabulary is the union of the inputs' resolved genes (default ``config.tokenizer``).
        For rank-value tokenization the genes' non-zero medians are computed in a first streaming pass.
    config
        Build options (:class:`CorpusConfig`).
    log
        Receives progress and report lines (default: the ``atlasformer`` logger, at info level). A progress bar
        counts the cells tokenized (:func:`~atlasformer.tokenization.console.progress_bar`).

    Returns
    -------
    The manifest (also written to ``<output>/manifest.json``).
    """
    config = config or CorpusConfig()
    if isinstance(tokenizer, TokenizerConfig):
        config, tokenizer = replace(config, tokenizer=tokenizer), None
    root = Path(output)
    refuse_output_over_inputs([root], [i for i in inputs if "://" not in str(i)])  # SOMA URIs are not local paths
    excluded: list[dict] = []
    sources = _open_sources(inputs, config, excluded, log)
    try:
        manifest, tokenizer, prepared = _start(root, sources, tokenizer, config, excluded, log)
        if not manifest["complete"]:
            cell_offset = 0  # the subsampling hash sees cells numbered across inputs, as pretraining does
            pending = [i for i, record in enumerate(manifest["inputs"]) if record["status"] == "pending"]
            remaining = sum(prepared[i].source.n_obs - manifest["inputs"][i]["next_row"] for i in pending)
            with progress_bar(remaining, desc="tokenize", unit="cells") as bar:
                for i, item in enumerate(prepared):
                    if i in pending:
                        _write_input(root, manifest, i, item, tokenizer, config, cell_offset, log, bar)
                    cell_offset += item.source.n_obs
            manifest["complete"] = True
            write_json_atomic(root / MANIFEST, manifest)
    finally:
        for source in sources:
            source.close()
    n_excluded = sum(r["status"] == "excluded" for r in manifest["inputs"]) + len(manifest["excluded"])
    log(f"corpus {root}: {manifest['n_cells']:,} cells, {manifest['n_tokens']:,} tokens in {len(manifest['shards'])} "
        f"shard(s) from {len(manifest['inputs'])} input(s)" + (f"; {n_excluded} excluded" if n_excluded else ""))
    return manifest


def _start(root: Path, sources, tokenizer: CellTokenizer | None, config: CorpusConfig, excluded, log):
    """Check the inputs, fix the vocabulary, and resume or start the manifest (nothing is tokenized yet)."""
    resolutions = _resolve_all(sources, config, tokenizer, excluded, log)
    _check_species(sources, resolutions, config)
    given = tokenizer is not None
    tok_config = tokenizer.config if given else config.tokenizer
    vocab = tokenizer.vocab if given else build_vocab(
        [s.var_adata() for s in sources], gene_key=config.gene_key, specials=tok_config.special_tokens,
        sources=[s.path for s in sources], gene_id_mode=tok_config.gene_id_mode, gene_table=tok_config.gene_table)
    settings = {
        "format_version": FORMAT_VERSION, "tokenizer": asdict(tok_config),
        "vocab_sha256": hashlib.sha256(json.dumps(vocab.token_to_id, sort_keys=True).encode()).hexdigest(),
        "medians_sha256": _medians_sha(tokenizer) if given else None,
        "layer": config.layer, "gene_key": config.gene_key, "batch_key": config.batch_key,
        "labels_key": config.labels_key, "shard_size": config.shard_size, "on_bad_input": config.on_bad_input,
        "inputs": [{"kind": s.kind, **s.identity()} for s in sources],
    }
    fingerprint = _fingerprint(settings)
    manifest = _prepare_output(root, fingerprint, config, log)
    if manifest is not None and manifest["complete"]:
        log(f"{root}: corpus already complete ({manifest['n_cells']:,} cells); nothing to do.")
        return manifest, tokenizer or CellTokenizer.load(root), []
    if tokenizer is None:
        tokenizer = _new_tokenizer(root, vocab, tok_config, sources, resolutions, config, resumed=manifest is not None,
                                   log=log)
    prepared = _prepare_inputs(sources, resolutions, tokenizer, config, excluded, given, log)
    if manifest is None:
        tokenizer.save(root)
        manifest = _new_manifest(root, fingerprint, settings, tokenizer, prepared, excluded, config)
        write_json_atomic(root / MANIFEST, manifest)
    return manifest, tokenizer, prepared


def _bad_input(path: str, err: InputError, config: CorpusConfig, excluded: list[dict], log) -> None:
    """Raise, or (on_bad_input=skip) record the input as excluded with its reason."""
    if config.on_bad_input == "error":
        raise err
    log(f"excluded: {err}")
    excluded.append({"path": str(path), "error": str(err)})


def _open_sources(inputs, config: CorpusConfig, excluded: list[dict], log) -> list[CorpusInput]:
    sources = []
    for kind, path in expand_corpus_paths(list(inputs)):
        try:
            sources.append(open_corpus_input(kind, path, soma_measurement=config.soma_measurement))
        except InputError as err:
            _bad_input(path, err, config, excluded, log)
    if not sources:
        raise InputError("no usable input: every --data input was excluded (see the messages above).")
    return sources


def _resolve_all(sources: list[CorpusInput], config: CorpusConfig, tokenizer, excluded, log) -> dict[int, object]:
    """Gene-ID resolution of every input; inputs without any usable identifier are errors (or excluded)."""
    tok_cfg = tokenizer.config if tokenizer is not None else config.tokenizer
    resolutions = {}
    for source in list(sources):
        try:
            resolution = resolve_genes(source.var_adata(), config.gene_key, source=source.path,
                                       gene_id_mode=tok_cfg.gene_id_mode, gene_table=tok_cfg.gene_table)
            require_identifiers(resolution, source.path)
        except InputError as err:
            _bad_input(source.path, err, config, excluded, log)
            sources.remove(source)
            source.close()
            continue
        resolutions[id(source)] = resolution
    if not sources:
        raise InputError("no usable input: every --data input was excluded (see the messages above).")
    return resolutions


def input_species(resolution, var: pd.DataFrame) -> str:
    """Species of one input: the gene-ID report's guess, else from names (ENSMUSG / ENSG, symbol case)."""
    species = getattr(resolution.report, "species", "unknown")
    if species != "unknown":
        return "non-human" if species.startswith("non-human") else species
    names = pd.Series(np.asarray(var.index, dtype=str))
    if names.str.match(r"^ENSMUSG\d").mean() > 0.5:
        return "mouse"
    if names.str.match(r"^ENSG\d").mean() > 0.5:
        return "human"
    letters = names[names.str.contains(r"[A-Za-z]")]
    if len(letters) and letters.str.match(r"^[A-Z][a-z0-9]").mean() > 0.5:
        return "non-human"  # mouse-style symbols (Cd8a)
    return "unknown"


def _check_species(sources, resolutions, config: CorpusConfig) -> None:
    species = {s.path: input_species(resolutions[id(s)], s.var) for s in sources}
    known = {v for v in species.values() if v != "unknown"}
    if len(known) > 1 and not config.allow_mixed_species:
        listing = "; ".join(f"{Path(p).name}: {v}" for p, v in species.items())
        raise InputError(f"inputs of different species in one corpus ({listing}). Build one corpus per species, "
                         "or pass allow_mixed_species=true (e.g. with an ortholog gene table).")


def _medians_sha(tokenizer: CellTokenizer) -> str | None:
    if tokenizer.gene_medians is None:
        return None
    return hashlib.sha256(json.dumps(tokenizer.gene_medians, sort_keys=True).encode()).hexdigest()


def _new_tokenizer(root: Path, vocab: GeneVocab, tok_config: TokenizerConfig, sources, resolutions,
                   config: CorpusConfig, *, resumed: bool, log) -> CellTokenizer:
    """A tokenizer over ``vocab``; for rank-value input the gene medians come from a streaming pass
    (or, when resuming, from the corpus folder where the first run saved them)."""
    if tok_config.kind != "rank":
        return CellTokenizer(vocab, tok_config)
    if resumed:
        return CellTokenizer.load(root)
    log(f"computing gene medians over {sum(s.n_obs for s in sources):,} cells (streaming pass) ...")
    genes = vocab.genes
    accumulator = MedianAccumulator(genes, target_sum=tok_config.target_sum)
    index = pd.Index(genes)
    for source in sources:
        keys = pd.Index(["" if k is None else k for k in resolutions[id(source)].keys])
        gene_of_column = index.get_indexer(keys)  # -1: not a vocabulary gene
        for start in range(0, source.n_obs, config.chunk_size):
            counts, _ = source.read(start, min(start + config.chunk_size, source.n_obs), layer=config.layer)
            accumulator.add(counts, gene_of_column)
        source.close()
    return CellTokenizer(vocab, tok_config, gene_medians=accumulator.medians())


def _prepare_inputs(sources, resolutions, tokenizer: CellTokenizer, config: CorpusConfig, excluded, given: bool,
                    log) -> list[_Prepared]:
    """Column ids and overlap checks of every input before anything is written."""
    prepared = []
    for source in sources:
        try:
            resolution = resolutions[id(source)]
            column_ids = vocab_column_ids(tokenizer, resolution.keys, source=str(source.path))
            overlap = None
            if given:  # a model's vocabulary: check the overlap on the file's counts before writing
                totals = source.gene_counts(layer=config.layer, chunk_size=config.chunk_size)
                overlap = tokenizer.check_overlap(column_ids, source=source.path, gene_counts=totals)
                resolution.set_expressed(totals > 0)
        except InputError as err:
            _bad_input(source.path, err, config, excluded, log)
            continue
        log(resolution.report.summary())
        prepared.append(_Prepared(source, column_ids, {
            "path": source.path, "name": source.name, "kind": source.kind, "status": "pending", "next_row": 0,
            "n_cells": source.n_obs, "n_genes": len(source.var), "n_genes_in_vocab": int((column_ids >= 0).sum()),
            "overlap": overlap, "species": input_species(resolution, source.var),
            "gene_ids": json.loads(json.dumps(asdict(resolution.report), default=str)),
            "missing_obs_keys": [k for k in (config.batch_key, config.labels_key) if k and k not in source.obs_columns],
        }))
    if not prepared:
        raise InputError("no usable input: every --data input was excluded (see the messages above).")
    return prepared


def _new_manifest(root: Path, fingerprint, settings, tokenizer: CellTokenizer, prepared, excluded, config) -> dict:
    files = {name: sha256_file(root / name) for name in TOKENIZER_FILES if (root / name).exists()}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "complete": False, "fingerprint": fingerprint,
        "settings": settings, "kind": tokenizer.config.kind, "vocab_size": len(tokenizer.vocab),
        "tokenizer_files": files,
        "dtypes": storage_dtypes(tokenizer), "batch_key": config.batch_key, "labels_key": config.labels_key,
        "obs_values": {}, "inputs": [p.record for p in prepared], "excluded": excluded, "shards": [],
        "next_shard": 0, "n_cells": 0, "n_tokens": 0,
    }


def _chunk_obs(obs: pd.DataFrame, cells: TokenizedCells, start: int, index: int, name: str, config) -> pd.DataFrame:
    """Per-cell metadata of the kept cells of one chunk."""
    kept = cells.cell_index - start
    out = {"source": np.full(len(kept), index, dtype=np.int32), "cell_index": cells.cell_index.astype(np.int64),
           "obs_name": np.asarray(obs.index[kept], dtype=str)}
    if config.batch_key:
        out[config.batch_key] = obs[config.batch_key].astype(str).to_numpy()[kept] if config.batch_key in obs \
            else np.full(len(kept), name, dtype=object)
    if config.labels_key and config.labels_key != config.batch_key:
        out[config.labels_key] = obs[config.labels_key].astype(str).to_numpy()[kept] if config.labels_key in obs \
            else np.full(len(kept), None, dtype=object)
    return pd.DataFrame(out)


def _write_input(root: Path, manifest: dict, index: int, item: _Prepared, tokenizer: CellTokenizer,
                 config: CorpusConfig, cell_offset: int, log, bar) -> None:
    """Tokenize one input from its next row on, shard by shard, listing each shard once it is complete."""
    record, source = manifest["inputs"][index], item.source
    if config.batch_key in record["missing_obs_keys"]:
        log(f"{source.path}: obs has no {config.batch_key!r} column; its cells get the batch {source.name!r}.")
    if config.labels_key in record["missing_obs_keys"] and config.labels_key != config.batch_key:
        log(f"{source.path}: obs has no {config.labels_key!r} column; its cells get empty labels.")
    try:
        for shard_start in range(record["next_row"], source.n_obs, config.shard_size):
            shard = _write_shard(root, manifest, index, item, tokenizer, config, cell_offset, shard_start, bar)
            manifest["next_shard"] += 1  # names are never reused, even for shards removed later
            manifest["shards"].append(shard)
            record["next_row"] = shard["rows"][1]
            _update_obs_values(root, manifest, shard, config)
            _recount(manifest)
            write_json_atomic(root / MANIFEST, manifest)  # the shard counts from here on
            log(f"{source.name}: rows {shard['rows'][0]}-{shard['rows'][1]} -> {shard['name']} ({shard['n_cells']:,} cells)")
        if record["n_cells_kept"] == 0:
            raise InputError(f"{source.path}: no cell has counts on the vocabulary's genes; nothing to tokenize.")
    except InputError as err:
        if config.on_bad_input == "error":
            raise
        _exclude_written(root, manifest, index, str(err), log)
        return
    finally:
        source.close()  # one input open at a time
    record["status"] = "complete"
    write_json_atomic(root / MANIFEST, manifest)
    log(f"{source.name}: {record['n_cells_kept']:,}/{record['n_cells']:,} cells kept "
        f"({record['n_empty_dropped']:,} empty cells dropped)")


def _write_shard(root: Path, manifest: dict, index: int, item: _Prepared, tokenizer: CellTokenizer,
                 config: CorpusConfig, cell_offset: int, shard_start: int, bar) -> dict:
    """Rows ``shard_start:shard_start + shard_size`` of one input into a committed (not yet listed) shard."""
    source = item.source
    shard_stop = min(shard_start + config.shard_size, source.n_obs)
    writer = ShardWriter(root, f"shard-{manifest['next_shard']:05d}", manifest["dtypes"])
    try:
        for start in range(shard_start, shard_stop, config.chunk_size):
            stop = min(start + config.chunk_size, shard_stop)
            counts, obs = source.read(start, stop, layer=config.layer)
            rows = np.arange(start, stop, dtype=np.int64)
            cells = tokenizer.encode(counts, item.column_ids, cell_index=rows + cell_offset)
            cells.cell_index = cells.cell_index - cell_offset  # rows local to the input
            writer.add(cells, _chunk_obs(obs, cells, start, index, source.name, config))
            bar.update(stop - start)
        shard = writer.commit()
    except BaseException:
        writer.abort()  # nothing half-written stays behind, whatever stopped us
        raise
    return {**shard, "input": index, "rows": [shard_start, shard_stop]}


def _exclude_written(root: Path, manifest: dict, index: int, error: str, log) -> None:
    record = manifest["inputs"][index]
    for shard in [s for s in manifest["shards"] if s["input"] == index]:
        manifest["shards"].remove(shard)
    record.update(status="excluded", error=error)
    _recount(manifest)
    write_json_atomic(root / MANIFEST, manifest)  # unlist first, then delete
    for name in [p for p in root.iterdir() if p.name.startswith("shard-")]:
        if name.name not in {s["name"] for s in manifest["shards"]}:
            shutil.rmtree(name)
    log(f"excluded: {error}")


def _update_obs_values(root: Path, manifest: dict, shard: dict, config: CorpusConfig) -> None:
    """Sorted distinct batch / label values over the corpus (the condition table of pretraining)."""
    keys = [k for k in (config.batch_key, config.labels_key) if k]
    if not keys:
        return
    obs = pd.read_parquet(root / shard["name"] / OBS_FILE, columns=list(dict.fromkeys(keys)))
    for key in dict.fromkeys(keys):
        seen = set(manifest["obs_values"].get(key, [])) | set(obs[key].dropna().astype(str))
        manifest["obs_values"][key] = sorted(seen)
