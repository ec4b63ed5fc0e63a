"""What every task shares: building a task model from a checkpoint or from scratch, tokenizing AnnData for
it, splitting cells, chunked inference, and writing annotated copies of the input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import copy as shallow_copy
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from atlasformer.checkpoints import export_model_folder, load_model_folder, public_name, resolve_model
from atlasformer.model_zoo import CellTransformer, CellTransformerConfig
from atlasformer.model_zoo.from_tokenizer import config_for_tokenizer, tokenizer_mismatches
from atlasformer.tokenization import (
    CellTokenizer,
    InputError,
    TokenizedCells,
    build_vocab,
    collate,
    column_token_ids,
    gene_keys,
    iter_count_chunks,
    iter_tokenized,
    tokenize_anndata,
)
from atlasformer.tokenization.anndata_io import check_obs_key
from atlasformer.tokenization.console import log_once, progress_bar
from atlasformer.tokenization.outputs import atomic_path

from .config import FinetuneConfig

logger = logging.getLogger(__name__)
SCRATCH_GENES_PER_CELL = 512
"""Genes per cell of a model fine-tuned from scratch when ``max_seq_len`` is not set."""


def load_backbone(model: str | os.PathLike | None, cfg: FinetuneConfig, adatas: list[ad.AnnData], *,
                  gene_key: str | None = None) -> tuple[CellTransformer | None, CellTokenizer, CellTransformerConfig]:
    """The pretrained backbone and tokenizer of ``model``, or (with ``from_scratch``) a fresh config and a
    tokenizer over the data's genes. Returns ``(backbone or None, tokenizer, config)``."""
    if cfg.from_scratch or model is None:
        if not cfg.from_scratch:
            raise InputError("no --model given: pass a model folder or hub id, or fine-tune from scratch (from_scratch=true).")
        vocab = build_vocab(adatas, gene_key=gene_key, specials=cfg.tokenizer.special_tokens,
                            gene_id_mode=cfg.tokenizer.gene_id_mode, gene_table=cfg.tokenizer.gene_table)
        tokenizer = CellTokenizer(vocab, dataclasses.replace(cfg.tokenizer, max_seq_len=cfg.max_seq_len or SCRATCH_GENES_PER_CELL))
        try:
            config = config_for_tokenizer(tokenizer, value_head="none", **cfg.scratch_model)
        except ValueError as err:
            raise InputError(f"scratch_model: {err}") from err
        return None, tokenizer, config
    pretrained, tokenizer = load_model_folder(resolve_model(model))  # scGPT / Geneformer converted on the fly
    tokenizer = CellTokenizer(tokenizer.vocab, _with_seq_len(tokenizer.config, cfg.max_seq_len), tokenizer.gene_medians)
    backbone = pretrained.backbone if hasattr(pretrained, "backbone") else pretrained
    problems = tokenizer_mismatches(backbone.config, tokenizer)  # max_seq_len may now exceed the positions
    if problems:
        raise InputError(f"{model}: {'; '.join(problems)}.")
    return backbone, tokenizer, CellTransformerConfig(**backbone.config.to_dict())


def _with_seq_len(tok_cfg, max_seq_len):
    return tok_cfg if max_seq_len is None else dataclasses.replace(tok_cfg, max_seq_len=max_seq_len)


def inference_device(cpu: bool = False) -> torch.device:
    """Where models run outside the training loop: this process's GPU when there is one, unless ``cpu``.

    Each process of a launch takes the GPU of its ``LOCAL_RANK``, as the training engine does.
    """
    if cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def to_inference_device(model: torch.nn.Module, cpu: bool = False) -> torch.nn.Module:
    """Move ``model`` (in place) to :func:`inference_device` and return it."""
    device = inference_device(cpu)
    logger.debug("model on %s", device)  # `atlasformer -v` says where inference runs
    return model.to(device)


def build_task_model(model_cls, backbone: CellTransformer | None, config: CellTransformerConfig, *, seed: int,
                     cpu: bool = False, **head_config):
    """Instantiate ``model_cls`` with ``head_config`` added to the backbone config, copying pretrained weights.

    The new weights (head, and the backbone from scratch) are drawn from ``seed``, in a forked RNG so the
    caller's random state is untouched: the same seed gives the same fine-tuned model. The model is placed on
    :func:`inference_device` (the GPU, unless ``cpu``), where its frozen embeddings and readouts are computed.
    """
    base = {k: v for k, v in config.to_dict().items() if k not in ("architectures", "id2label", "label2id", "task")}
    task_config = CellTransformerConfig(**{**base, **head_config})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(task_config)
    if backbone is not None:
        model.backbone.load_state_dict(backbone.state_dict())
    return to_inference_device(model, cpu)


def tokenize_for_model(adata: ad.AnnData, tokenizer: CellTokenizer, *, layer=None, gene_key=None, source="data"):
    """Tokenize all of ``adata``; returns TokenizedData (cells with no vocabulary gene are dropped and counted).

    The report is logged once per process: every head fine-tuned on the file tokenizes it alike."""
    data = tokenize_anndata(adata, tokenizer, layer=layer, gene_key=gene_key, source=source)
    log_once(logger, data.report.summary())
    return data


def model_batch(cells: TokenizedCells, rows: np.ndarray, tokenizer: CellTokenizer) -> dict[str, torch.Tensor]:
    """Padded model inputs for the cells at ``rows`` (without the bookkeeping ``rows`` tensor)."""
    batch = collate(cells, rows, cls_id=tokenizer.vocab.cls_id, pad_id=tokenizer.vocab.pad_id,
                    max_width=1 + tokenizer.config.max_seq_len)  # known here: no pass over every cell per batch
    batch.pop("rows")
    return batch


RANDOM_FOLDS = 5
"""Folds of cross-fitting without batches."""
MAX_BATCH_FOLDS = 10
"""Batches beyond this many share folds (whole batches each), so an atlas of 100 donors costs 10 fits, not 100."""


def cross_fitting_folds(batches: np.ndarray | None, n_cells: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """(fold of each cell (n_cells,), how the folds were made) for calibrating on out-of-fold predictions: the
    cell's batch when ``batches`` holds at least 2 (a held-out batch is what a query from a new donor looks like;
    beyond :data:`MAX_BATCH_FOLDS` batches, whole batches are dealt over that many folds), else one of
    :data:`RANDOM_FOLDS` seeded random folds."""
    if batches is not None:
        codes, names = pd.factorize(pd.Series(np.asarray(batches)).astype(str))
        if len(names) > MAX_BATCH_FOLDS:
            codes = np.random.default_rng([seed, 29]).permutation(len(names))[codes] % MAX_BATCH_FOLDS
            return codes, f"{len(names)} batches in {MAX_BATCH_FOLDS} folds"
        if len(names) >= 2:
            return codes, f"{len(names)} batches"
    n_folds = min(RANDOM_FOLDS, n_cells)
    folds = np.random.default_rng([seed, 0x4D4150]).permutation(np.arange(n_cells) % n_folds)  # "MAP"
    return folds, f"{n_folds} random folds"


def split_cells(obs: pd.DataFrame, cfg: FinetuneConfig, batch_key: str | None, usable: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation positions: the cells of ``cfg.val_batch``, or a seeded random fraction.

    Every task passes its ``batch_key`` here, so a batch key that names no obs column is refused for all.
    """
    check_obs_key(obs, batch_key, source="data", what="batch_key")
    positions = np.arange(len(obs)) if usable is None else np.flatnonzero(usable)
    if cfg.val_batch is not None:
        if batch_key is None or batch_key not in obs:
            raise InputError(f"val_batch={cfg.val_batch!r} needs --batch-key naming an obs column.")
        in_val = obs[batch_key].astype(str).to_numpy()[positions] == str(cfg.val_batch)
        if not in_val.any():
            raise InputError(f"val_batch={cfg.val_batch!r} matches no cell in obs[{batch_key!r}]; "
                             f"values: {sorted(obs[batch_key].astype(str).unique())[:10]}.")
        return positions[~in_val], positions[in_val]
    perm = np.random.default_rng([cfg.seed, 11]).permutation(positions)
    n_val = max(1, int(round(len(perm) * cfg.val_fraction))) if cfg.val_fraction > 0 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@torch.no_grad()
def run_model(model, cells: TokenizedCells, tokenizer: CellTokenizer, rows: np.ndarray | None = None,
              batch_size: int = 64, outputs: Callable = lambda out: out.cell_embedding, device=None, **extra) -> np.ndarray:
    """Apply ``model`` to cells in batches and stack ``outputs(model_output)`` as a numpy array.

    ``extra`` maps a name to a per-cell numpy array passed to the model as a tensor (e.g. conditions).
    """
    model.eval()
    device = device or next(model.parameters()).device
    rows = np.arange(len(cells)) if rows is None else rows
    results = []
    for start in range(0, len(rows), batch_size):
        sel = rows[start : start + batch_size]
        batch = {k: v.to(device) for k, v in model_batch(cells, sel, tokenizer).items()}
        batch.update({k: torch.as_tensor(v[sel]).to(device) for k, v in extra.items()})
        results.append(outputs(model(**batch)).float().cpu().numpy())
    return np.concatenate(results) if results else np.zeros((0,))


FROZEN_CACHE_CELLS = 200_000
"""How many cells' frozen embeddings :func:`frozen_embeddings` remembers (64 floats each at d_model 64)."""
_frozen_cache: OrderedDict[tuple[bytes, bytes], np.ndarray] = OrderedDict()


def weights_fingerprint(module: torch.nn.Module) -> bytes:
    """A digest of every parameter and buffer: equal only for identical weights."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()


def frozen_embeddings(backbone: torch.nn.Module, cells: TokenizedCells, tokenizer: CellTokenizer) -> np.ndarray:
    """(cells, d_model) cell embeddings of a backbone that is not trained, remembered per cell (by the backbone's
    weights and the cell's tokens): a refit on the same cells (another fold, seed or head) skips the forward
    pass, which is most of a frozen fine-tuning's cost."""
    model_key = weights_fingerprint(backbone)
    cell_keys = [hashlib.blake2b(cells.gene_ids[lo:hi].tobytes() + cells.values[lo:hi].tobytes(),
                                 digest_size=16).digest() for lo, hi in zip(cells.offsets[:-1], cells.offsets[1:])]
    missing = np.asarray([i for i, key in enumerate(cell_keys) if (model_key, key) not in _frozen_cache], dtype=np.int64)
    if len(missing):
        for i, row in zip(missing, run_model(backbone, cells, tokenizer, rows=missing)):
            _frozen_cache[(model_key, cell_keys[i])] = row
        while len(_frozen_cache) > FROZEN_CACHE_CELLS:
            _frozen_cache.popitem(last=False)
    if not cell_keys:
        return np.zeros((0, backbone.config.d_model), dtype=np.float32)
    return np.stack([_frozen_cache[(model_key, key)] for key in cell_keys])


def iter_model_outputs(model, adata: ad.AnnData, tokenizer: CellTokenizer, *, layer=None, gene_key=None, source="data",
                       chunk_size: int = 2048, batch_size: int = 64, outputs: Callable = lambda out: out.cell_embedding,
                       extra: dict[str, np.ndarray] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream ``adata`` chunk by chunk: yield ``(cell rows, outputs)`` so memory does not grow with the file.

    ``extra`` maps a model input name to a per-cell array over all of ``adata``'s rows (e.g. conditions).
    A progress bar named after ``source`` counts the cells (embed and predict spend their time here).
    """
    ids = column_token_ids(adata, tokenizer, layer=layer, gene_key=gene_key, source=source)
    with progress_bar(adata.n_obs, desc=Path(str(source)).name, unit="cells") as bar:
        for start, cells in iter_tokenized(adata, tokenizer, ids, layer=layer, chunk_size=chunk_size, source=source):
            if len(cells):
                per_cell = {k: np.asarray(v)[cells.cell_index] for k, v in (extra or {}).items()}
                yield cells.cell_index, run_model(model, cells, tokenizer, batch_size=batch_size, outputs=outputs,
                                                  **per_cell)
            bar.update(min(chunk_size, adata.n_obs - start))


def read_counts(adata: ad.AnnData, layer: str | None = None, source: str = "data"):
    """All of ``adata``'s counts as one checked float32 CSR matrix (read chunk by chunk; backed works)."""
    import scipy.sparse as sp

    return sp.vstack([chunk.counts for chunk in iter_count_chunks(adata, layer=layer, source=source)]).tocsr()


def model_gene_keys(adata: ad.AnnData, tokenizer: CellTokenizer, gene_key: str | None = None,
                    source: str = "data") -> pd.Index:
    """``adata``'s gene keys as ``tokenizer`` maps them (its gene-ID mode and gene table), one per var."""
    return gene_keys(adata, gene_key, source=source, gene_id_mode=tokenizer.config.gene_id_mode,
                     gene_table=tokenizer.config.gene_table)


def gene_report(adata: ad.AnnData, tokenizer: CellTokenizer, *, gene_key=None, source="data",
                features: list[str] | None = None) -> dict:
    """Log and return how ``adata``'s genes meet a fitted model: genes the model does not know (dropped), the
    model's genes absent from the file (treated as not expressed) and, for ``features`` a task predicts per
    gene, the ones the file lacks."""
    keys = model_gene_keys(adata, tokenizer, gene_key, source)
    ids = tokenizer.vocab.lookup(keys)
    n_vocab = len(tokenizer.vocab) - len(tokenizer.config.special_tokens)
    report = {"n_genes": len(keys), "n_genes_in_vocab": int((ids >= 0).sum()),
              "n_vocab_genes_missing": int(n_vocab - len(set(ids[ids >= 0].tolist()))),
              "unknown_genes_example": list(keys[ids < 0][:10])}
    line = (f"{source}: {report['n_genes_in_vocab']}/{len(keys)} genes are in the model's vocabulary "
            f"({len(keys) - report['n_genes_in_vocab']} dropped, e.g. {report['unknown_genes_example'][:5]}); "
            f"{report['n_vocab_genes_missing']} of the model's {n_vocab} genes are absent and read as not expressed")
    if features is not None:
        missing = sorted(set(features) - set(keys))
        report.update(n_features=len(features), n_features_missing=len(missing), features_missing_example=missing[:10])
        line += f"; {len(missing)} of the {len(features)} genes the model predicts are not in this file"
    logger.info(line + ".")
    return report


def output_adata(adata: ad.AnnData, with_x: bool = False) -> ad.AnnData:
    """A new AnnData with the input's obs and var (and X only when asked), for annotated outputs."""
    x = None
    if with_x:
        x = adata.X.to_memory() if hasattr(adata.X, "to_memory") else adata.X
        x = x[:] if x is not None else None
    return ad.AnnData(X=x, obs=adata.obs.copy(), var=adata.var.copy()) if with_x else ad.AnnData(
        obs=adata.obs.copy(), var=adata.var.copy())


def write_h5ad_atomic(adata: ad.AnnData, path: str | os.PathLike) -> Path:
    """Write ``adata`` through :func:`~atlasformer.tokenization.outputs.atomic_path` (a temporary file renamed
    into place)."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return Path(path)


PROVENANCE_KEY = "atlasformer"
"""``uns[PROVENANCE_KEY][<slot>][<key>]``: which model, layer and settings produced each key (FORMATS.md), e.g.
``uns['atlasformer']['obsm']['X_atlasformer']``."""


def annotation_snapshot(adata: ad.AnnData) -> dict:
    """What :func:`changed_keys` compares: obs columns by value, obsm / layers / uns entries by identity."""
    return {"obs": adata.obs.copy(), **{slot: {k: id(v) for k, v in getattr(adata, slot).items()}
                                        for slot in ("obsm", "layers", "uns")}}


def changed_keys(before: dict, adata: ad.AnnData) -> set[tuple[str, str]]:
    """Keys written since ``before`` (new or replaced), as ``(slot, key)``."""
    old_obs = before["obs"]
    keys = {("obs", c) for c in adata.obs.columns if c not in old_obs or not adata.obs[c].equals(old_obs[c])}
    for slot in ("obsm", "layers", "uns"):
        keys |= {(slot, k) for k, v in getattr(adata, slot).items() if before[slot].get(k) != id(v)}
    return keys


def record_provenance(target: ad.AnnData, keys, *, model, layer: str | None, settings: dict, weights=None) -> None:
    """Write ``uns['atlasformer'][slot][key]`` for each written ``(slot, key)``, as scanpy records
    ``uns['pca']['params']``.

    Values are strings (h5ad stores no None): the model as given (name, folder or hub id), the SHA-256 of its
    manifest when it is a local model folder, a digest of the weights used, the layer, the settings as JSON and
    the atlasformer version.
    """
    from importlib.metadata import version

    folder = Path(str(model)) if model is not None else None
    manifest = folder / "atlasformer.json" if folder is not None and folder.is_dir() else None
    entry = {
        "model": "none (from scratch)" if model is None else str(model),
        "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest and manifest.exists() else "",
        "weights_digest": weights_fingerprint(weights).hex() if weights is not None else "",
        "layer": layer or "X",
        "settings": json.dumps(settings, default=str, sort_keys=True),
        "atlasformer_version": version("atlasformer"),
    }
    store = {slot: dict(records) for slot, records in target.uns.get(PROVENANCE_KEY, {}).items()}
    for slot, key in sorted(keys):
        if (slot, key) != ("uns", PROVENANCE_KEY):
            store.setdefault(slot, {})[key] = dict(entry)
    target.uns[PROVENANCE_KEY] = store


class FinetunedTask:
    """What the four fine-tuning tasks share: the guard for an unfitted task, embeddings, provenance, and saving
    and loading the model folder. A task sets ``model_class`` (its ``CellTransformerFor...``) and ``model``/
    ``tokenizer``/``validation`` in ``fit``; its constructor takes ``(model, config, **keys)``. Each task
    implements :class:`~atlasformer.finetune.task.Task`."""

    model_class: type
    model = None
    tokenizer = None
    validation: dict  # set per instance by the task's constructor and fit
    required_keys: tuple[str, ...] = ()
    """Constructor keys (obs columns) fine-tuning cannot do without; the CLI asks for their flags."""
    prediction_keys: tuple[str, ...] = ()
    """Constructor keys (obs columns) that change what ``predict`` / ``write_outputs`` produce on new data; the
    CLI's ``predict`` passes these flags and refuses the others."""

    def _require_model(self) -> None:
        if self.model is None:
            name = type(self).__name__
            raise InputError(f"this {name} has no model yet: call fit(adata) or {name}.load(folder).")

    def _inference_model(self):
        """The model, on :func:`inference_device` (the GPU when there is one, unless ``config.cpu``)."""
        self._require_model()
        return to_inference_device(self.model, self.config.cpu)

    def _model_extra(self, adata: ad.AnnData, source: str) -> dict | None:
        """Per-cell model inputs beyond the tokens, aligned with ``adata``'s rows: the expression path's input
        when the model has one."""
        genes = self.model.config.expression_genes
        if not genes:
            return None
        from .expression import expression_inputs

        return {"expression": expression_inputs(adata, genes, self.tokenizer, layer=self.layer, gene_key=self.gene_key,
                                                source=source)}

    def embed(self, adata: ad.AnnData, source: str = "data") -> np.ndarray:
        """(cells, d_model) cell embeddings of the fine-tuned backbone; zeros for cells without vocabulary genes."""
        model = self._inference_model()
        out = np.zeros((adata.n_obs, model.config.d_model), dtype=np.float32)
        for rows, emb in iter_model_outputs(model, adata, self.tokenizer, layer=self.layer, gene_key=self.gene_key,
                                            source=source, chunk_size=self.config.chunk_size,
                                            extra=self._model_extra(adata, source)):
            out[rows] = emb
        return out

    @contextmanager
    def _recording_provenance(self, target: ad.AnnData) -> Iterator[None]:
        """Around a task's ``write_outputs``: record in ``target.uns['atlasformer']`` which model, layer and
        settings produced each key written into ``target`` inside the block (nothing when the block fails)."""
        before = annotation_snapshot(target)
        yield
        record_provenance(target, changed_keys(before, target), model=getattr(self, "model_source", None),
                          layer=self.layer, settings=dataclasses.asdict(self.config), weights=self.model)

    def save(self, folder: str | Path, run_config: dict | None = None, *, overwrite: bool = False) -> Path:
        """Export the fine-tuned model folder: model (with its task's names), tokenizer, manifest and a card
        with the validation metrics. An existing folder with files atlasformer did not write is refused unless
        ``overwrite``."""
        self._require_model()
        summary = {k: v for k, v in self.validation.items() if isinstance(v, (int, float))}
        run_config = dict(run_config or {})
        source = getattr(self, "model_source", None)
        if source is not None and not self.config.from_scratch:
            run_config.setdefault("base_model", public_name(source))
        return export_model_folder(self.model, self.tokenizer, folder, run_config, summary, overwrite=overwrite)

    @classmethod
    def load(cls, folder, config: FinetuneConfig | None = None, **keys):
        """Load a fine-tuned folder or hub id written by :meth:`save`; ``keys`` go to the constructor."""
        model, tokenizer = load_model_folder(resolve_model(folder))
        if not isinstance(model, cls.model_class):
            raise InputError(f"{folder}: not a model for {cls.__name__} (it is {type(model).__name__}, expected "
                             f"{cls.model_class.__name__}); load it with the task it was fine-tuned for.")
        task = cls(folder, config, **cls._keys_from_model(model, keys))
        task.model, task.tokenizer = model, tokenizer
        return task

    @classmethod
    def _keys_from_model(cls, model, keys: dict) -> dict:
        """Constructor keys, with any the saved model fixes (e.g. the modality) taken from it."""
        return keys

    @classmethod
    def apply(cls, adata: ad.AnnData, model, *, copy: bool, layer=None, gene_key=None, config_changes=None,
              **write_kw) -> ad.AnnData | None:
        """The body of the scanpy-shaped functions (``annotate``, ``integrate``, ...): load ``model`` unless it
        is a fitted task, write its outputs into ``adata`` (or a copy, returned).

        A fitted task passed in is never changed: ``layer``, ``gene_key`` and the config changes apply to a
        shallow copy of it, for this call only.
        """
        if isinstance(model, cls):
            task = shallow_copy(model)
            task.layer = layer if layer is not None else model.layer
            task.gene_key = gene_key if gene_key is not None else model.gene_key
        else:
            task = cls.load(model, layer=layer, gene_key=gene_key)
        if config_changes:
            task.config = dataclasses.replace(task.config, **config_changes)
        target = adata.copy() if copy else adata
        task.write_outputs(adata, target, **write_kw)
        return target if copy else None
