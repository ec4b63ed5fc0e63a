"""The mapping task of the benchmark (BENCHMARKS.md section 5): each method places a query in a reference space
and labels it with a confidence, without the query's labels.

A method takes a :class:`~atlasformer.finetune.benchmark_methods.Split` (``train`` = reference cells, ``test`` =
query cells) and returns a :class:`Mapped`: the query's transferred labels (the best-supported reference label,
also where a method would say "unknown"), their confidence, whether the method called the cell unknown, and the
joint embedding of reference and query (for iLISI).

Methods: ``atlasformer`` (``atlasformer map`` with an annotation model fine-tuned on the reference by the
default recipe: its classifier gives the labels and confidences, :func:`~atlasformer.finetune.mapping.classifier_labels`,
in the default representation of :func:`~atlasformer.finetune.mapping.map_query`: expression PCs beside the
embedding), ``atlasformer_zeroshot`` (calibrated weighted kNN on the pretrained model's embedding alone), ``scanvi`` (scVI on reference and query, then
scANVI with the query unlabelled: scvi-tools' recipe), ``scvi_surgery`` (scVI on the reference, the query mapped by
training only its new batch weights, then kNN), ``logreg`` (on log-normalised reference HVGs) and ``pca_knn``.
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from . import baselines as b
from .annotation import UNKNOWN, Annotator
from .benchmark_methods import Split, finetune_config
from .mapping import classifier_labels, mapping_representation, transfer_labels
from .vae_models import SCANVIModel, SCVIModel

METHODS = ("atlasformer", "atlasformer_zeroshot", "scanvi", "scvi_surgery", "logreg", "pca_knn")
METRICS = ("accuracy", "macro_f1", "ece", "auroc_error", "ilisi_query")
UNLABELLED = "__query__"  # scANVI's unlabelled category for the query cells


@dataclass
class Mapped:
    """What a mapping method returns for one fold."""

    labels: np.ndarray
    """(query cells,) the best-supported reference label."""
    confidence: np.ndarray
    """(query cells,) the method's confidence in that label, in [0, 1]."""
    unknown: np.ndarray
    """(query cells,) True where the method calls the cell unknown (its own rule; all False without one)."""
    joint: np.ndarray
    """(reference + query cells, dims) the embedding both were placed in, reference rows first."""


def _with_class_probabilities(model, x_train, y_train, x_test, joint) -> Mapped:
    probabilities = model.fit(x_train, y_train).predict_proba(x_test)  # (query cells, labels)
    labels = model.classes_[probabilities.argmax(1)]
    return Mapped(labels, probabilities.max(1), np.zeros(len(labels), bool), joint)


def logreg(split: Split) -> Mapped:
    train, test = split.hvgs(split.train), split.hvgs(split.test)
    model = LogisticRegression(C=1.0, max_iter=1000, random_state=split.seed)
    return _with_class_probabilities(model, train, split.inp.labels[split.train], test,
                                     np.vstack([split.pcs(split.train), split.pcs(split.test)]))


def knn_on(reference: np.ndarray, query: np.ndarray, split: Split) -> Mapped:
    model = KNeighborsClassifier(n_neighbors=min(split.cfg.k, len(reference)))
    return _with_class_probabilities(model, reference, split.inp.labels[split.train], query, np.vstack([reference, query]))


def pca_knn(split: Split) -> Mapped:
    return knn_on(split.pcs(split.train), split.pcs(split.test), split)


def atlasformer(split: Split, representation=None, fine_tune: bool = True) -> Mapped:
    inp = split.inp
    reference, query = split.adata(split.train), split.adata(split.test)
    model = inp.model
    if fine_tune:  # the annotation recipe on the reference; the query's labels are never seen
        model = Annotator(inp.model, finetune_config(inp, split.seed, split.cfg), labels_key=inp.labels_key,
                          batch_key=inp.batch_key, layer=inp.layer, gene_key=inp.gene_key)
        model.fit(reference, source="reference")
    ref_rep, query_rep, _ = mapping_representation(reference, query, model, representation, layer=inp.layer,
                                                   gene_key=inp.gene_key, seed=split.seed)
    scratch = ad.AnnData(obs=reference.obs[[inp.labels_key, *([inp.batch_key] if inp.batch_key else [])]].copy())
    scratch.obsm["rep"] = ref_rep
    target = ad.AnnData(obs=query.obs[[]].copy())
    target.obsm["rep"] = query_rep
    transfer_labels(target, scratch, labels_key=inp.labels_key, use_rep="rep", batch_key=inp.batch_key,
                    n_neighbors=split.cfg.k, seed=split.seed)
    if fine_tune:
        classifier_labels(target, model, query)
    return Mapped(target.obs["atlasformer_label_argmax"].astype(str).to_numpy(),
                  target.obs["atlasformer_confidence"].to_numpy(),
                  (target.obs["atlasformer_label"] == UNKNOWN).to_numpy(), np.vstack([ref_rep, query_rep]))


def _vae_genes(split: Split) -> np.ndarray:
    """HVG columns chosen on the reference cells (a mapped query brings no genes of its own)."""
    return b.select_hvgs(b.log_normalize(split.inp.counts[split.train]), split.cfg.n_hvgs)


def _vae_adata(split: Split, rows: np.ndarray, genes: np.ndarray) -> ad.AnnData:
    adata = split.inp.adata[rows][:, genes].copy()
    adata.obs = adata.obs.copy()
    return adata


def scvi_surgery(split: Split) -> Mapped:
    inp, genes = split.inp, _vae_genes(split)
    reference, query = _vae_adata(split, split.train, genes), _vae_adata(split, split.test, genes)
    # the encoder sees the batch (scArches' setting), so the query's new batch weights move its embedding
    model = SCVIModel(batch_key=inp.batch_key, layer=inp.layer, epochs=split.cfg.scvi_epochs, seed=split.seed,
                      encode_covariates=True)
    model.fit(reference, source="reference")
    mapped = model.map_query(query, source="query")
    return knn_on(mapped.embed(reference, source="reference"), mapped.embed(query, source="query"), split)


def scanvi(split: Split) -> Mapped:
    inp, genes = split.inp, _vae_genes(split)
    rows = np.concatenate([split.train, split.test])
    adata = _vae_adata(split, rows, genes)
    labels = np.concatenate([inp.labels[split.train], np.full(len(split.test), UNLABELLED)])
    adata.obs["mapping_label"] = labels
    scvi = SCVIModel(batch_key=inp.batch_key, layer=inp.layer, epochs=split.cfg.scvi_epochs, seed=split.seed)
    scvi.fit(adata, source="reference + query")
    model = SCANVIModel.from_scvi_model(scvi, labels_key="mapping_label", unlabeled_category=UNLABELLED)
    model.fit(adata, source="reference + query")
    query = adata[len(split.train):]
    probabilities = model.predict_proba(query, source="query")  # (query cells, labels)
    return Mapped(np.asarray(model.classes_)[probabilities.argmax(1)], probabilities.max(1),
                  np.zeros(len(split.test), bool), model.embed(adata, source="reference + query"))


MAPPING = {
    "atlasformer": atlasformer,
    "atlasformer_zeroshot": lambda s: atlasformer(s, representation="embedding", fine_tune=False),
    "scanvi": scanvi,
    "scvi_surgery": scvi_surgery,
    "logreg": logreg,
    "pca_knn": pca_knn,
}
"""Mapping methods by name: ``method(split) -> Mapped``."""


def composition_rows(mapped: Mapped) -> dict:
    """Without query labels: the unknown fraction and the predicted composition (fraction per label)."""
    labels = np.where(mapped.unknown, UNKNOWN, mapped.labels)
    values, counts = np.unique(labels, return_counts=True)
    return {"unknown_fraction": float(mapped.unknown.mean()),
            **{f"fraction_{v}": float(c / len(labels)) for v, c in zip(values, counts)}}
