"""Cell-type annotation: a classifier head on the cell embedding, fine-tuned on labelled cells.

Writes ``obs['<key_added>_label']`` (``"unknown"`` below ``unknown_threshold`` when one is set) and
``obs['<key_added>_confidence']`` (the highest class probability); ``key_added`` defaults to
``"atlasformer"``. Label transfer to a query with other genes works because cells are tokenized
through the model's vocabulary: genes the query lacks are simply absent from its tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from atlasformer.model_zoo import CellTransformerForAnnotation
from atlasformer.tokenization import InputError
from atlasformer.tokenization.anndata_io import check_obs_key

from .common import (
    FinetunedTask,
    build_task_model,
    iter_model_outputs,
    load_backbone,
    model_batch,
    run_model,
    split_cells,
    tokenize_for_model,
)
from .config import FinetuneConfig
from .expression import (
    expression_setup,
    fit_expression_path,
    fit_logistic_readout,
    out_of_fold_temperature,
    readout_inputs,
)
from .fit import fit
from .metrics import classification_metrics, plot_confusion_matrix

logger = logging.getLogger(__name__)

UNKNOWN = "unknown"


class Annotator(FinetunedTask):
    """Fine-tunes and applies a cell-type classifier (the task's user-facing model).

    Parameters
    ----------
    model
        Pretrained model folder or hub id; ignored with ``config.from_scratch``.
    config
        Fine-tuning settings.
    labels_key
        obs column with the cell types to learn.
    batch_key
        obs column with batches (needed for ``config.val_batch``).
    layer, gene_key
        Where counts and gene identifiers are.
    """

    model_class = CellTransformerForAnnotation
    required_keys = ("labels_key",)
    recipe = {"mode": "frozen", "lr": 2e-3, "readout": "linear", "expression_genes": 2000, "expression_pcs": 0,
              "embedding_weight": 0.02}
    """Defaults of the fields a FinetuneConfig leaves at None, chosen by measurement (docs/model_quality.md)."""

    def __init__(self, model=None, config: FinetuneConfig | None = None, *, labels_key: str = "cell_type",
                 batch_key: str | None = None, layer: str | None = None, gene_key: str | None = None):
        self.model_source = model
        self.config = (config or FinetuneConfig()).with_recipe(self.recipe)
        self.labels_key, self.batch_key, self.layer, self.gene_key = labels_key, batch_key, layer, gene_key
        self.model: CellTransformerForAnnotation | None = None
        self.tokenizer = None
        self.validation: dict = {}

    # ------------------------------------------------------------------ training
    def fit(self, adata: ad.AnnData, source: str = "data") -> dict:
        """Fine-tune on the labelled cells of ``adata``; returns validation metrics."""
        check_obs_key(adata.obs, self.labels_key, source=source)
        cfg = self.config
        backbone, self.tokenizer, config = load_backbone(self.model_source, cfg, [adata], gene_key=self.gene_key)
        data = tokenize_for_model(adata, self.tokenizer, layer=self.layer, gene_key=self.gene_key, source=source)
        labels = data.obs[self.labels_key]
        labelled = labels.notna().to_numpy() & (labels.astype(str) != "nan").to_numpy()
        if not labelled.all():  # said once, so a user sees why fewer cells trained than the file holds
            logger.warning(f"{source}: {int((~labelled).sum()):,} of {len(labelled):,} cells have no label in "
                           f"obs[{self.labels_key!r}] (NaN or empty); they are left out of training and validation "
                           "and still get a predicted label.")
        classes = sorted(labels[labelled].astype(str).unique())
        if len(classes) < 2:
            raise InputError(f"{source}: obs[{self.labels_key!r}] has {len(classes)} distinct label(s); annotation needs at least 2.")
        y = np.full(len(labels), -1, dtype=np.int64)
        y[labelled] = pd.Categorical(labels[labelled].astype(str), categories=classes).codes
        train, val = split_cells(data.obs, cfg, self.batch_key, usable=labelled)
        if len(val) == 0:
            val = train  # no held-out cells requested: validate on training cells
        val = val[np.isin(y[val], np.unique(y[train]))]  # score only classes the model could learn
        cells, tokenizer = data.cells, self.tokenizer
        # a closed-form readout on a frozen backbone needs no early stopping: its final fit uses every labelled cell
        closed_form = cfg.mode == "frozen" and cfg.readout == "linear"
        fit_rows = np.union1d(train, val) if closed_form else train
        head, expression = expression_setup(adata, tokenizer, cfg, cells.cell_index[fit_rows], layer=self.layer,
                                            gene_key=self.gene_key, source=source)
        model = build_task_model(CellTransformerForAnnotation, backbone, config, seed=cfg.seed, cpu=cfg.cpu,
                                 id2label={i: c for i, c in enumerate(classes)}, task="annotation", **head)
        x = None if expression is None else expression[cells.cell_index]  # (cells, genes), rows as cells
        if model.expression_path is not None:
            fit_expression_path(model.expression_path, x[fit_rows], cfg.seed)
        extra = {} if x is None else {"expression": x}

        def validate(m):
            probs = run_model(m, cells, tokenizer, rows=val, outputs=lambda out: out.logits.softmax(-1), **extra)
            pred = np.asarray(classes)[probs.argmax(1)]
            metrics = classification_metrics(np.asarray(classes)[y[val]], pred)
            metrics.update(n_train=int(len(train)), n_val=int(len(val)))
            return metrics["macro_f1"], metrics

        if cfg.readout == "linear":  # start from (frozen: end at) the closed-form fit on the pretrained embedding
            z = readout_inputs(model, model.classifier, cells, tokenizer, x, fit_rows, cfg)
            fit_logistic_readout(model.classifier, z[train], y[train], len(classes), cfg.seed)
        def validation_pairs(m):  # (true, predicted) labels of the validation cells, for the confusion matrix
            logits = run_model(m, cells, tokenizer, rows=val, outputs=lambda out: out.logits, **extra)
            return np.asarray(classes)[y[val]], np.asarray(classes)[logits.argmax(1)]

        if closed_form:
            model.eval()
            self.model, self.validation = model, validate(model)[1]  # scored on held-out cells, then refitted on all
            self.validation["refitted_on_all_cells"] = True
            self._val_pairs = validation_pairs(model)
            temperature = 1.0
            if cfg.calibrate:
                groups = None if self.batch_key is None else data.obs[self.batch_key].astype(str).to_numpy()[fit_rows]
                temperature = out_of_fold_temperature(z[fit_rows], y[fit_rows], len(classes), groups, cfg.seed)
            self.validation["temperature"] = temperature
            fit_logistic_readout(model.classifier, z[fit_rows], y[fit_rows], len(classes), cfg.seed,
                                 temperature=temperature)
        else:
            weights = None
            if cfg.class_weighting:
                freq = np.bincount(y[train], minlength=len(classes)).astype(np.float64)
                weights = torch.tensor(np.where(freq > 0, freq.sum() / np.maximum(freq, 1) / len(classes), 0.0),
                                       dtype=torch.float32)

            def make_batch(rows):
                sel = train[rows]
                batch = model_batch(cells, sel, tokenizer)
                batch["labels"] = torch.from_numpy(y[sel])
                batch.update({k: torch.from_numpy(v[sel]) for k, v in extra.items()})
                if weights is not None:
                    batch["class_weights"] = weights
                return batch

            self.model, self.validation = fit(model, len(train), make_batch, validate, cfg, description="annotation",
                                              metric="macro_f1", start_is_candidate=cfg.readout == "linear")
            self._val_pairs = validation_pairs(self.model)
        return self.validation

    # ------------------------------------------------------------------ inference

    def predict_proba(self, adata: ad.AnnData, source: str = "data") -> tuple[np.ndarray, np.ndarray]:
        """``(probabilities (cells, classes), class names)``: the classifier's softmax for every cell (zeros for
        cells without any vocabulary gene)."""
        model = self._inference_model()
        id2label = model.config.id2label
        classes = np.asarray([id2label[i] for i in range(len(id2label))], dtype=object)
        probabilities = np.zeros((adata.n_obs, len(classes)), dtype=np.float32)
        for rows, probs in iter_model_outputs(model, adata, self.tokenizer, layer=self.layer, gene_key=self.gene_key,
                                              source=source, chunk_size=self.config.chunk_size,
                                              outputs=lambda out: out.logits.float().softmax(-1),
                                              extra=self._model_extra(adata, source)):
            probabilities[rows] = probs
        return probabilities, classes

    def predict(self, adata: ad.AnnData, source: str = "data") -> pd.DataFrame:
        """Per cell: ``label`` (``"unknown"`` below the threshold) and ``confidence``; index = obs_names."""
        probabilities, classes = self.predict_proba(adata, source)
        label = classes[probabilities.argmax(1)].astype(object)
        label[probabilities.sum(1) == 0] = UNKNOWN  # cells without a vocabulary gene were not run
        confidence = probabilities.max(1)
        if self.config.unknown_threshold is not None:
            label[confidence < self.config.unknown_threshold] = UNKNOWN
        return pd.DataFrame({"label": label, "confidence": confidence}, index=adata.obs_names)

    def write_outputs(self, adata: ad.AnnData, target: ad.AnnData, *, key_added: str = "atlasformer", source: str = "data") -> None:
        """Write predictions for ``adata`` into ``target.obs`` (FORMATS.md keys), and their provenance into
        ``target.uns['atlasformer']``."""
        pred = self.predict(adata, source=source)
        with self._recording_provenance(target):
            target.obs[f"{key_added}_label"] = pd.Categorical(pred["label"].to_numpy())
            target.obs[f"{key_added}_confidence"] = pred["confidence"].to_numpy()

    def plots(self, output: Path) -> list[Path]:
        if not hasattr(self, "_val_pairs"):
            return []
        true, pred = self._val_pairs
        path = Path(output) / "confusion_matrix.png"
        plot_confusion_matrix(true, pred, path, "validation cells")
        return [path]


def annotate(adata: ad.AnnData, model, *, key_added: str = "atlasformer", unknown_threshold: float | None = None,
             layer: str | None = None, gene_key: str | None = None, copy: bool = False) -> ad.AnnData | None:
    """Predict cell types with a fine-tuned annotation model.

    Parameters
    ----------
    adata
        Raw counts (``X`` or ``layers[layer]``).
    model
        A fine-tuned annotation folder, hub id, or :class:`Annotator`.
    key_added
        Writes ``obs[f"{key_added}_label"]`` and ``obs[f"{key_added}_confidence"]``.
    unknown_threshold
        Label cells below this confidence ``"unknown"``.
    copy
        Return an annotated copy instead of writing into ``adata``.
    """
    changes = {"unknown_threshold": unknown_threshold} if unknown_threshold is not None else None
    return Annotator.apply(adata, model, copy=copy, layer=layer, gene_key=gene_key, config_changes=changes,
                           key_added=key_added)
