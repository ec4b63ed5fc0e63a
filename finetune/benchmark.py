"""The benchmark protocol of docs/benchmarks.md (BENCHMARKS.md): every method on identical work, several seeds.

:func:`run_benchmark` runs one task on one file with the chosen methods and seeds and writes
``<output>/results.json`` (rows ``{task, dataset, method, metric, seed, value}``, plus per-fold rows with a
``fold`` key), ``<output>/timings.json``, ``<output>/report.md`` and plots. A method a file cannot support
(no ``--model``, genes outside the model's vocabulary, scvi-tools not installed, ...) is skipped with the
reason in the report; a task the file cannot support at all raises :class:`InputError` naming what is missing.

Methods: ``atlasformer`` (fine-tuned from the pretrained ``model``), ``atlasformer_scratch`` (the same
architecture and budget from random initialisation), ``atlasformer_zeroshot`` (the pretrained embedding,
not fine-tuned, with kNN / ridge / kNN smoothing on top), ``scvi`` and ``totalvi`` (our VAEs), ``scvi_tools``
(the reference package), and the simple baselines of :mod:`atlasformer.finetune.baselines`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasformer.checkpoints import CheckpointError
from atlasformer.tokenization import InputError, check_counts, input_stem, read_h5ad
from atlasformer.tokenization.anndata_io import check_obs_key, count_matrix, to_csr
from atlasformer.tokenization.corpus_format import write_json_atomic

from . import baselines
from . import benchmark_mapping as mapping
from . import benchmark_methods as m
from .benchmark_report import ATLAS_METHODS, LOWER_IS_BETTER, write_report
from .config import FinetuneConfig
from .metrics import (
    atac_metrics,
    binomial_thinning,
    classification_metrics,
    clr,
    imputation_metrics,
    protein_metrics,
)

TASKS = ("annotation", "integration", "imputation", "modality", "mapping")
TASK_METHODS = {
    "annotation": (*ATLAS_METHODS, "scvi", "scvi_tools", "logreg", "pca_knn"),
    "integration": (*ATLAS_METHODS, "scvi", "scvi_tools", "pca", "harmony"),
    "imputation": (*ATLAS_METHODS, "scvi", "scvi_tools", "no_denoising", "knn_smoothing"),
    "modality": (*ATLAS_METHODS, "totalvi", "mean", "ridge", "knn"),
    "mapping": mapping.METHODS,
}
METRICS = {
    "annotation": ("accuracy", "macro_f1"),
    "integration": ("bio_conservation", "batch_correction", "total"),
    "imputation": ("poisson_nll", "pearson_log1p"),
    "protein": ("rmse", "pearson_per_feature", "pearson_per_cell"),
    "atac": ("auroc", "auroc_per_feature"),
    "mapping": mapping.METRICS,
}
MCV_TOP_GENES = 2000


@dataclass(frozen=True)
class BenchmarkConfig:
    """Budgets and protocol constants of a benchmark run (``key=value`` overrides on the command line)."""

    n_hvgs: int = 2000
    """HVGs chosen on the training cells (seurat flavour)."""
    n_pcs: int = 50
    """Principal components fitted on the training cells."""
    k: int = 15
    """Neighbours of the kNN classifier, regressor and smoother."""
    max_holdout_batches: int = 3
    """Annotation: hold out at most this many of the largest batches, one at a time."""
    min_holdout_cells: int = 100
    """Annotation: a held-out batch needs at least this many labelled cells."""
    imputation_max_cells: int = 4000
    """Imputation: a seeded subsample of at most this many cells."""
    thinning_p: float = 0.9
    """Imputation: x_train ~ Binomial(x, p)."""
    scvi_epochs: int | None = None
    """scVI / scvi-tools epochs (None: scvi-tools' heuristic, min(20000 / cells x 400, 400))."""
    totalvi_epochs: int | None = None
    """totalVI epochs (None: scvi-tools' heuristic; early stopping as scvi-tools)."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Fine-tuning settings of atlasformer and atlasformer_scratch (the same for both); fields left at None take
    each task's recipe, the defaults `atlasformer finetune` uses."""
    scratch_lr: float | None = None
    """Learning rate of atlasformer_scratch (None: finetune.lr, or the task's recipe)."""
    scib_disable: tuple[str, ...] = ()
    """scib-metrics metrics to switch off (reported), e.g. kbet_per_label on tiny data."""
    threads: int = 1
    """torch threads (other jobs may share the machine)."""

    def __post_init__(self):
        if not 0 < self.thinning_p < 1:
            raise ValueError(f"thinning_p must be in (0, 1), got {self.thinning_p}")
        if self.k < 1 or self.n_pcs < 1 or self.n_hvgs < 1:
            raise ValueError("k, n_pcs and n_hvgs must be positive")


@dataclass
class Inputs:
    """One benchmark file, read into memory once, with its keys resolved."""

    adata: ad.AnnData
    dataset: str
    source: str
    counts: sp.csr_matrix
    labels: np.ndarray | None = None
    batch: np.ndarray | None = None
    paired: ad.AnnData | None = None
    modality: str | None = None
    labels_key: str | None = None
    batch_key: str | None = None
    layer: str | None = None
    gene_key: str | None = None
    model: str | None = None
    query_rows: np.ndarray | None = None
    """Mapping onto a reference file: the rows of ``adata`` that came from ``--query`` (no labels used)."""
    cache: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)

    @property
    def n_batches(self) -> int:
        return 0 if self.batch is None else len(np.unique(self.batch))


def dataset_name(path: str | Path) -> str:
    """File name without ``.h5ad`` and without a ``.rna`` suffix (FORMATS.md)."""
    stem = input_stem(path)
    return stem[: -len(".rna")] if stem.endswith(".rna") else stem


def load_inputs(data, *, paired=None, modality=None, labels_key=None, batch_key=None, layer=None, gene_key=None,
                model=None, query=None) -> Inputs:
    adata = read_h5ad(data, backed=False)
    source = str(data)
    query_rows = None
    if query is not None:  # mapping a query file onto the reference file: one AnnData, query rows last
        adata, query_rows = reference_and_query(adata, read_h5ad(query, backed=False), labels_key=labels_key,
                                                batch_key=batch_key, layer=layer, gene_key=gene_key)
        gene_key = None  # the joined file is named by gene_key's identifiers
        source = f"{data} + {query}"
    counts = to_csr(count_matrix(adata, layer))
    check_counts(counts, source=source, layer=layer)
    labels = batch = None
    if labels_key:
        check_obs_key(adata.obs, labels_key, source=source)
        labels = adata.obs[labels_key].astype(str).to_numpy()
    if batch_key:
        check_obs_key(adata.obs, batch_key, source=source, what="batch_key")
        batch = adata.obs[batch_key].astype(str).to_numpy()
    other = None
    if paired is not None:
        if modality not in ("protein", "atac"):
            raise InputError("--paired needs --modality protein or --modality atac.")
        other = read_h5ad(paired, backed=False)
        if other.n_obs != adata.n_obs or not np.array_equal(other.obs_names, adata.obs_names):
            raise InputError(f"{paired}: obs_names differ from {data}; paired files need the same cells in the same order.")
    name = dataset_name(data) if query is None else f"{dataset_name(data)}_to_{dataset_name(query)}"
    return Inputs(adata, name, source, counts, labels, batch, other, modality, labels_key, batch_key,
                  layer, gene_key, None if model is None else str(model), query_rows)


def reference_and_query(reference: ad.AnnData, query: ad.AnnData, *, labels_key, batch_key, layer, gene_key
                        ) -> tuple[ad.AnnData, np.ndarray]:
    """Reference and query cells in one AnnData over their shared genes (the baselines need the same columns),
    the query's labels blanked (never used) and its batch named ``query`` where it has none."""
    if gene_key:
        reference, query = (a[:, ~a.var[gene_key].duplicated().to_numpy()].copy() for a in (reference, query))
        reference.var_names, query.var_names = (a.var[gene_key].astype(str).to_numpy() for a in (reference, query))
    shared = reference.var_names.intersection(query.var_names)
    if len(shared) < 200:
        raise InputError(f"reference and query share {len(shared)} gene names; mapping needs at least 200. Name "
                         "both files' genes the same way (--gene-key COLUMN).")
    parts = []
    for part, name in ((reference, "reference"), (query, "query")):
        counts = count_matrix(part[:, shared], layer)
        obs = pd.DataFrame(index=[f"{name}:{i}" for i in part.obs_names])
        obs[labels_key] = part.obs[labels_key].astype(str).to_numpy() if name == "reference" else "nan"
        if batch_key:
            obs[batch_key] = (part.obs[batch_key].astype(str).to_numpy() if batch_key in part.obs
                              else np.full(part.n_obs, name))
        parts.append(ad.AnnData(to_csr(counts), obs=obs, var=pd.DataFrame(index=shared)))
    joined = ad.concat(parts, merge="first")
    if layer:
        joined.layers[layer] = joined.X
    return joined, np.arange(reference.n_obs, joined.n_obs)


def labelled_mask(labels: np.ndarray) -> np.ndarray:
    return ~pd.Series(labels).isin(["nan", "None", "", "NaN"]).to_numpy()


def check_task(task: str, inp: Inputs, cfg: BenchmarkConfig) -> None:
    """Raise :class:`InputError` naming what the file lacks for ``task``."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose from {list(TASKS)}.")
    needs_labels = task in ("annotation", "integration", "mapping")
    if needs_labels and inp.labels is None:
        raise InputError(f"{inp.source}: {task} needs cell labels (for {'training' if task == 'annotation' else 'scoring'}); "
                         "pass --labels-key naming the obs column. This file supports imputation without labels.")
    if needs_labels and len(set(inp.labels[labelled_mask(inp.labels)])) < 2:
        raise InputError(f"{inp.source}: obs[{inp.labels_key!r}] has fewer than 2 labels; {task} cannot be scored.")
    if task == "mapping" and inp.query_rows is not None:
        return
    if task in ("annotation", "integration", "mapping") and inp.n_batches < 2:
        what = "no --batch-key" if inp.batch is None else f"one batch in obs[{inp.batch_key!r}]"
        raise InputError(f"{inp.source}: {task} holds out / integrates batches, but the file has {what}. "
                         "Pass --batch-key with at least 2 batches, or run imputation or modality.")
    if task in ("annotation", "mapping") and not annotation_holdouts(inp, cfg):
        raise InputError(f"{inp.source}: no batch has {cfg.min_holdout_cells} labelled cells to hold out.")
    if task == "modality" and inp.paired is None:
        raise InputError("modality needs --paired FILE (protein or ATAC counts of the same cells) and --modality.")


def plan_methods(task: str, inp: Inputs, requested) -> tuple[list[str], dict[str, str]]:
    """Methods to run and ``{method: reason}`` for those this file or environment cannot support."""
    known = TASK_METHODS[task]
    unknown = [x for x in (requested or ()) if x not in known]
    if unknown:
        raise InputError(f"methods {unknown} do not apply to {task}; choose from {list(known)}.")
    methods, skipped = list(requested or known), {}
    for method in list(methods):
        reason = m.unsupported(method, task, inp)
        if reason:
            skipped[method] = reason
            methods.remove(method)
    return methods, skipped


class Clock:
    """Wall time per method, summed over folds and seeds."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, method: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[method] += time.perf_counter() - start


def annotation_holdouts(inp: Inputs, cfg: BenchmarkConfig) -> list[str]:
    """The (at most ``max_holdout_batches``) largest batches with at least ``min_holdout_cells`` labelled cells."""
    labelled = labelled_mask(inp.labels)
    sizes = pd.Series(inp.batch[labelled]).value_counts()
    sizes = sizes[sizes >= cfg.min_holdout_cells]
    sizes = sizes[sizes < labelled.sum()]  # something must remain for training
    return list(sizes.index[: cfg.max_holdout_batches])


def call(method: str, table: dict, arg, inp: Inputs, clock: Clock):
    """``table[method](arg)`` timed; a data or checkpoint problem marks the method failed (reported), not the run."""
    with clock(method):
        try:
            return table[method](arg)
        except (InputError, CheckpointError) as err:
            inp.failed[method] = f"failed: {err}"
            return None


# ------------------------------------------------------------------ tasks: each returns {method: [(fold, metrics)]}
def run_annotation(inp: Inputs, methods, seed: int, cfg: BenchmarkConfig, clock: Clock) -> dict:
    labelled = labelled_mask(inp.labels)
    out = defaultdict(list)
    for fold in annotation_holdouts(inp, cfg):
        train = np.flatnonzero(labelled & (inp.batch != fold))
        test = np.flatnonzero(labelled & (inp.batch == fold) & np.isin(inp.labels, np.unique(inp.labels[train])))
        split = m.Split(inp, train, test, seed, cfg, fold=fold)
        for method in [x for x in methods if x not in inp.failed]:
            pred = call(method, m.ANNOTATION, split, inp, clock)
            if pred is None:
                continue
            scores = classification_metrics(inp.labels[test], pred)
            out[method].append((fold, {k: scores[k] for k in METRICS["annotation"]}))
    return out


def run_integration(inp: Inputs, methods, seed: int, cfg: BenchmarkConfig, clock: Clock) -> dict:
    everything = np.arange(inp.adata.n_obs)
    split = m.Split(inp, everything, everything, seed, cfg)
    embeddings = {}
    for method in methods:
        embedding = call(method, m.INTEGRATION, split, inp, clock)
        if embedding is not None:
            embeddings[method] = embedding
    from .metrics import scib_scores

    labelled = labelled_mask(inp.labels)
    scored = scib_scores({k: v[labelled] for k, v in embeddings.items()}, inp.batch[labelled], inp.labels[labelled],
                         pre_integrated=split.pcs(everything)[labelled], disable=cfg.scib_disable)
    inp.cache["scib_disabled"] = scored["disabled"]
    return {name: [(None, {k: s[k] for k in METRICS["integration"]})] for name, s in scored["methods"].items()}


def run_imputation(inp: Inputs, methods, seed: int, cfg: BenchmarkConfig, clock: Clock) -> dict:
    rng = np.random.default_rng([seed, 3])
    n = inp.adata.n_obs
    cells = np.sort(rng.choice(n, cfg.imputation_max_cells, replace=False)) if n > cfg.imputation_max_cells else np.arange(n)
    x_train, x_test = binomial_thinning(inp.counts[cells], p=cfg.thinning_p, seed=seed)
    thinned = m.Thinned(inp, cells, x_train, seed, cfg)
    out = {}
    for method in methods:
        proportions = call(method, m.IMPUTATION, thinned, inp, clock)
        if proportions is None:
            continue
        out[method] = [(None, imputation_metrics(proportions, x_test, x_train, n_top=MCV_TOP_GENES))]
    return out


def modality_directions(inp: Inputs, seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Both directions between exactly two batches; otherwise one seeded 50/50 split of the cells."""
    if inp.n_batches == 2:
        a, b = sorted(np.unique(inp.batch))
        in_a = inp.batch == a
        return [(f"{a}->{b}", np.flatnonzero(in_a), np.flatnonzero(~in_a)),
                (f"{b}->{a}", np.flatnonzero(~in_a), np.flatnonzero(in_a))]
    perm = np.random.default_rng([seed, 5]).permutation(inp.adata.n_obs)
    half = len(perm) // 2
    return [("random_half", np.sort(perm[:half]), np.sort(perm[half:]))]


def modality_targets(inp: Inputs) -> np.ndarray:
    counts = to_csr(count_matrix(inp.paired))
    return clr(counts) if inp.modality == "protein" else (counts.toarray() > 0).astype(np.float32)


def run_modality(inp: Inputs, methods, seed: int, cfg: BenchmarkConfig, clock: Clock) -> dict:
    targets = inp.cache.setdefault("targets", modality_targets(inp))
    score = protein_metrics if inp.modality == "protein" else atac_metrics
    out = defaultdict(list)
    for fold, train, test in modality_directions(inp, seed):
        split = m.Split(inp, train, test, seed, cfg, fold=fold, targets=targets)
        for method in [x for x in methods if x not in inp.failed]:
            pred = call(method, m.MODALITY, split, inp, clock)
            if pred is None:
                continue
            scores = score(targets[test], pred)
            out[method].append((fold, {k: scores[k] for k in METRICS[inp.modality]}))
    return out


def run_mapping(inp: Inputs, methods, seed: int, cfg: BenchmarkConfig, clock: Clock) -> dict:
    """The annotation folds with the held-out batch as the query (scored on its labels); or, with a query file,
    one fold scored by the predicted composition and unknown fraction (no query labels)."""
    from .metrics import mapping_metrics

    labelled = labelled_mask(inp.labels)
    if inp.query_rows is not None:
        reference = np.setdiff1d(np.flatnonzero(labelled), inp.query_rows)
        folds = [("query", reference, inp.query_rows)]
    else:
        folds = []
        for fold in annotation_holdouts(inp, cfg):
            train = np.flatnonzero(labelled & (inp.batch != fold))
            test = np.flatnonzero(labelled & (inp.batch == fold) & np.isin(inp.labels, np.unique(inp.labels[train])))
            folds.append((fold, train, test))
    out = defaultdict(list)
    for fold, train, test in folds:
        split = m.Split(inp, train, test, seed, cfg, fold=fold)
        for method in [x for x in methods if x not in inp.failed]:
            mapped = call(method, mapping.MAPPING, split, inp, clock)
            if mapped is None:
                continue
            if inp.query_rows is not None:
                out[method].append((fold, mapping.composition_rows(mapped)))
                continue
            is_query = np.r_[np.zeros(len(train), bool), np.ones(len(test), bool)]
            scores = mapping_metrics(inp.labels[test], mapped.labels, mapped.confidence, mapped.joint, is_query)
            scores["unknown_fraction"] = float(mapped.unknown.mean())
            out[method].append((fold, scores))
    return out


RUNNERS = {"annotation": run_annotation, "integration": run_integration, "imputation": run_imputation,
           "modality": run_modality, "mapping": run_mapping}


def result_rows(task: str, dataset: str, seed: int, results: dict) -> list[dict]:
    """Aggregate rows (mean over folds) and, when there are folds, per-fold rows with a ``fold`` key."""
    rows = []
    for method, folds in results.items():
        for metric in folds[0][1]:
            values = [scores[metric] for _, scores in folds]
            rows.append({"task": task, "dataset": dataset, "method": method, "metric": metric, "seed": seed,
                         "value": float(np.nanmean(values))})
            if folds[0][0] is not None:
                rows += [{"task": task, "dataset": dataset, "method": method, "metric": metric, "seed": seed,
                          "value": float(scores[metric]), "fold": str(fold)} for fold, scores in folds]
    return rows


def run_benchmark(task: str, data, *, output, paired=None, modality=None, labels_key=None, batch_key=None, layer=None,
                  gene_key=None, model=None, methods=None, seeds=(0, 1, 2), config: BenchmarkConfig | None = None,
                  command: str = "", query=None) -> dict:
    """Run ``task`` on ``data`` with every applicable method and seed; write results, report and plots.

    Returns ``{"rows": [...], "timings": {method: seconds}, "skipped": {method: reason}, "report": path}``.
    """
    import numba
    import torch

    cfg = config or BenchmarkConfig()
    # numba (scanpy's kernels) shares torch's OpenMP runtime and sets it to every core when its thread pool
    # starts: start it first, limited, then set torch's threads, or the torch methods use every core
    numba.set_num_threads(min(cfg.threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(cfg.threads)
    if query is not None and task != "mapping":
        raise InputError(f"--query is the mapping task's query file; {task} takes none.")
    inp = load_inputs(data, paired=paired, modality=modality, labels_key=labels_key, batch_key=batch_key, layer=layer,
                      gene_key=gene_key, model=model, query=query)
    check_task(task, inp, cfg)
    chosen, skipped = plan_methods(task, inp, methods)
    if inp.modality == "atac" and "totalvi" in chosen:
        chosen.remove("totalvi")
        skipped["totalvi"] = "totalVI models protein counts; it does not apply to ATAC."
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    rows, clock = [], Clock()
    for seed in seeds:
        active = [x for x in chosen if x not in inp.failed]
        results = RUNNERS[task](inp, active, int(seed), cfg, clock)
        results = {k: v for k, v in results.items() if k not in inp.failed}
        rows += result_rows(task, inp.dataset, int(seed), results)
        write_json_atomic(output / "results.json", rows, default=float)
    skipped.update(inp.failed)
    chosen = [x for x in chosen if x not in inp.failed]
    timings = {k: round(v, 2) for k, v in clock.seconds.items()}
    meta = {"task": task, "dataset": inp.dataset, "modality": inp.modality, "seeds": [int(s) for s in seeds],
            "methods": chosen, "skipped": skipped, "timings_s": timings, "command": command,
            "n_cells": int(inp.adata.n_obs), "n_genes": int(inp.adata.n_vars),
            "scib_disabled": inp.cache.get("scib_disabled", []), "config": _plain(cfg)}
    write_json_atomic(output / "timings.json", meta, default=float)
    report = write_report(rows, [meta], output / "report.md", plots_dir=output)
    return {"rows": rows, "timings": timings, "skipped": skipped, "report": str(report)}


def _plain(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


__all__ = ["LOWER_IS_BETTER", "TASKS", "TASK_METHODS", "BenchmarkConfig", "baselines", "run_benchmark"]
