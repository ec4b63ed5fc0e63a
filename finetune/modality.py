"""Modality prediction: a cell's protein (CITE-seq ADT) or chromatin accessibility (ATAC) from its RNA.

Trained on paired cells, given as a second file with identical ``obs_names`` (``paired``), an ``obsm``
key of the RNA AnnData (``paired_obsm``; rows that are all NaN are RNA-only cells), or the other
modality of a MuData file (:func:`read_mudata_pair`). Targets follow BENCHMARKS.md: protein as the
per-cell CLR of counts (``log1p(x) - mean over proteins of log1p(x)``, MSE loss), ATAC as accessibility
``x > 0`` (BCE loss).

Writes ``obsm['protein_predicted']`` (CLR scale) or ``obsm['atac_predicted']`` (accessibility
probability), with feature names in ``uns['protein_predicted_names']`` / ``uns['atac_predicted_names']``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from atlasformer.model_zoo import CellTransformerForModality
from atlasformer.tokenization import InputError, read_h5ad

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
    fit_per_feature_logistic_readout,
    fit_ridge_readout,
    readout_inputs,
)
from .fit import fit
from .metrics import atac_metrics, clr, protein_metrics
from .plots import predicted_vs_observed, roc_curve_plot

logger = logging.getLogger(__name__)

ATAC_PENALTIES = (0.001, 0.01, 0.1, 1.0)


def one_standard_error_choice(true: np.ndarray, predictions: list[np.ndarray], seed: int = 0,
                              n_bootstrap: int = 100) -> tuple[int, list[float], float]:
    """Index of the most regularised of ``predictions`` (ordered strongest penalty first) whose validation AUROC
    is within one standard error of the best (the one-standard-error rule of cross-validated penalties).

    On a small validation split the best AUROC is partly luck: a weak penalty that wins by noise overfits the
    test cells (scicar: 0.548 where the mean predictor gets 0.583). The standard error is the bootstrap spread of
    the best score over validation cells (resampled with their peaks, which are correlated within a cell).
    Returns ``(index, scores, standard_error)``.
    """
    from sklearn.metrics import roc_auc_score

    true = np.asarray(true) > 0
    scores = [atac_metrics(true, p)["auroc"] for p in predictions]
    best = int(np.nanargmax(scores))
    rng = np.random.default_rng([seed, 11])
    boot = []
    for _ in range(n_bootstrap):
        cells = rng.integers(0, len(true), len(true))
        sample = true[cells]
        if sample.any() and not sample.all():
            boot.append(roc_auc_score(sample.ravel(), predictions[best][cells].ravel()))
    se = float(np.std(boot)) if len(boot) > 1 else 0.0
    chosen = next(i for i, score in enumerate(scores) if score >= scores[best] - se)
    return chosen, scores, se
"""Inverse L2 penalties (scikit-learn's C) tried for the per-peak logistic readout."""
MODALITY_NAMES = {"protein": ("prot", "protein", "adt", "cite"), "atac": ("atac", "peaks", "chromatin")}


def read_mudata_pair(path: str | os.PathLike, modality: Literal["protein", "atac"], *, rna: str = "rna"):
    """``(rna, other)`` AnnData of a MuData ``.h5mu`` file (needs the ``mudata`` package).

    The other modality is the first of ``MODALITY_NAMES[modality]`` present in ``mdata.mod``.
    """
    try:
        import mudata
    except ImportError as err:
        raise InputError("reading .h5mu files needs the mudata package: pip install mudata "
                         "(or pass the paired modality as a second h5ad file).") from err
    mdata = mudata.read_h5mu(path)
    other = next((m for m in MODALITY_NAMES[modality] if m in mdata.mod), None)
    if rna not in mdata.mod or other is None:
        raise InputError(f"{path}: needs modalities {rna!r} and one of {MODALITY_NAMES[modality]}; has {list(mdata.mod)}.")
    return mdata.mod[rna], mdata.mod[other]


def paired_matrix(adata: ad.AnnData, paired, *, source: str = "data") -> tuple[np.ndarray, list[str]]:
    """(cells of ``adata``, features) dense values of a paired AnnData / file, aligned by ``obs_names``."""
    if isinstance(paired, (str, os.PathLike)) and str(paired).endswith(".h5mu"):
        raise InputError(f"{paired}: a MuData file; read it with read_mudata_pair(path, modality) and pass the "
                         "other modality, or use the paired h5ad files.")
    if isinstance(paired, (str, os.PathLike)):
        label = str(paired)
        paired = read_h5ad(paired, backed=False)
    else:
        label = "paired data"
    if set(paired.obs_names) != set(adata.obs_names) or paired.n_obs != adata.n_obs:
        shared = len(set(paired.obs_names) & set(adata.obs_names))
        raise InputError(f"{label}: obs_names must be identical to {source}'s ({adata.n_obs} cells; {paired.n_obs} in the "
                         f"paired file, {shared} shared). Pass both modalities of the same cells.")
    if not paired.obs_names.equals(adata.obs_names):
        paired = paired[adata.obs_names]  # same cells in another order
    x = paired.X.to_memory() if hasattr(paired.X, "to_memory") else paired.X
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    return x.astype(np.float32), [str(n) for n in paired.var_names]


def obsm_matrix(adata: ad.AnnData, key: str, *, source: str = "data") -> tuple[np.ndarray, list[str]]:
    """Paired values stored in ``adata.obsm[key]`` and their names (DataFrame columns, ``uns[key + '_names']``)."""
    if key not in adata.obsm:
        raise InputError(f"{source}: obsm[{key!r}] not found; available: {list(adata.obsm.keys())}.")
    value = adata.obsm[key]
    if isinstance(value, pd.DataFrame):
        return value.to_numpy(dtype=np.float32), [str(c) for c in value.columns]
    x = value.toarray() if sp.issparse(value) else np.asarray(value)
    names = adata.uns.get(f"{key}_names")
    names = [str(n) for n in names] if names is not None else [f"{key}_{i}" for i in range(x.shape[1])]
    return x.astype(np.float32), names


def modality_targets(values: np.ndarray, modality: str, source: str = "paired data") -> np.ndarray:
    """Training targets from paired raw values: per-cell CLR (protein) or ``x > 0`` (ATAC)."""
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() < 0:
        raise InputError(f"{source}: negative values (min {finite.min():.3g}); pass raw {modality} counts, "
                         "atlasformer computes the targets (CLR for protein, x > 0 for ATAC).")
    if modality == "protein":
        return clr(np.nan_to_num(values))
    return (values > 0).astype(np.float32)


def start_at_mean(model: CellTransformerForModality, mean: np.ndarray, modality: str) -> None:
    """Set the output bias to the training mean (as a logit for ATAC): a head starting at the mean predictor
    learns the cell-specific part instead of spending its first steps on feature frequencies."""
    mean = np.asarray(mean, dtype=np.float64)
    bias = np.log(np.clip(mean, 1e-4, 1 - 1e-4) / np.clip(1 - mean, 1e-4, 1)) if modality == "atac" else mean
    with torch.no_grad():
        model.head.out.bias.copy_(torch.as_tensor(bias, dtype=model.head.out.bias.dtype))  # MLP head's output layer


class ModalityPredictor(FinetunedTask):
    """Fine-tunes and applies an RNA -> protein or RNA -> ATAC model (the task's user-facing model).

    Parameters
    ----------
    model
        Pretrained model folder or hub id; ignored with ``config.from_scratch``.
    config
        Fine-tuning settings.
    modality
        ``"protein"`` or ``"atac"``.
    paired
        The paired modality: an AnnData or h5ad path with the same ``obs_names`` (may also be given to ``fit``).
    paired_obsm
        Or the obsm key of the RNA AnnData holding the paired values (all-NaN rows: RNA-only cells).
    layer, gene_key, batch_key
        Where counts, gene identifiers and batches (for ``config.val_batch``) are.
    """

    model_class = CellTransformerForModality
    recipe = {"mode": "frozen", "lr": 2e-3, "readout": "linear", "expression_genes": 2000, "expression_pcs": 50,
              "embedding_weight": 0.02}
    """Defaults of the fields a FinetuneConfig leaves at None, chosen by measurement (docs/model_quality.md)."""

    def __init__(self, model=None, config: FinetuneConfig | None = None, *, modality: Literal["protein", "atac"] = "protein",
                 paired=None, paired_obsm: str | None = None, layer: str | None = None, gene_key: str | None = None,
                 batch_key: str | None = None):
        if modality not in MODALITY_NAMES:
            raise InputError(f"modality must be 'protein' or 'atac', got {modality!r}.")
        self.model_source = model
        self.config = (config or FinetuneConfig()).with_recipe(self.recipe)
        self.modality, self.paired, self.paired_obsm = modality, paired, paired_obsm
        self.layer, self.gene_key, self.batch_key = layer, gene_key, batch_key
        self.model: CellTransformerForModality | None = None
        self.tokenizer = None
        self.validation: dict = {}
        self._plot_data: dict | None = None

    @property
    def key_added(self) -> str:
        return f"{self.modality}_predicted"

    # ------------------------------------------------------------------ training
    def fit(self, adata: ad.AnnData, source: str = "data", paired=None) -> dict:
        """Fine-tune on the paired cells of ``adata``; returns validation metrics with the mean baseline's."""
        cfg = self.config
        paired = paired if paired is not None else self.paired
        if paired is None and self.paired_obsm is None:
            raise InputError("modality prediction needs the paired modality: --paired FILE (same obs_names) or "
                             "paired_obsm=KEY (an obsm key of the RNA file).")
        raw, names = (paired_matrix(adata, paired, source=source) if paired is not None
                      else obsm_matrix(adata, self.paired_obsm, source=source))
        has_target = ~np.all(np.isnan(raw), axis=1)
        targets = modality_targets(raw, self.modality)
        backbone, self.tokenizer, config = load_backbone(self.model_source, cfg, [adata], gene_key=self.gene_key)
        data = tokenize_for_model(adata, self.tokenizer, layer=self.layer, gene_key=self.gene_key, source=source)
        cells, tokenizer = data.cells, self.tokenizer
        y = targets[cells.cell_index]  # (cells, features), rows as data.cells
        train, val = split_cells(data.obs, cfg, self.batch_key, usable=has_target[cells.cell_index])
        if len(val) == 0:
            raise InputError("modality prediction is validated on held-out cells: set val_fraction > 0 or val_batch.")
        # a closed-form readout on a frozen backbone needs no early stopping: its final fit uses every paired cell
        closed_form = cfg.mode == "frozen" and cfg.readout == "linear"
        fit_rows = np.union1d(train, val) if closed_form else train
        head, expression = expression_setup(adata, tokenizer, cfg, cells.cell_index[fit_rows], layer=self.layer,
                                            gene_key=self.gene_key, source=source)
        model = build_task_model(CellTransformerForModality, backbone, config, seed=cfg.seed, cpu=cfg.cpu,
                                 modality=self.modality, feature_names=names, task="modality", **head)
        x = None if expression is None else expression[cells.cell_index]  # (cells, genes), rows as cells
        if model.expression_path is not None:
            fit_expression_path(model.expression_path, x[fit_rows], cfg.seed)
        extra = {} if x is None else {"expression": x}
        mean_prediction = np.broadcast_to(y[train].mean(0), y[val].shape)
        baseline = self._metrics(y[val], mean_prediction)

        def predictions(m, rows):
            return run_model(m, cells, tokenizer, rows=rows, outputs=lambda out: out.extras["predictions"], **extra)

        def validate(m):
            metrics = self._metrics(y[val], predictions(m, val))
            metrics.update(mean_baseline=baseline, n_train=int(len(train)), n_val=int(len(val)), n_features=len(names))
            score = -metrics["rmse"] if self.modality == "protein" else metrics["auroc_per_feature"]
            return (score if np.isfinite(score) else metrics.get("auroc", -np.inf)), metrics

        if cfg.readout == "linear":  # start from (frozen: end at) the closed-form fit on the pretrained embedding
            z = readout_inputs(model, model.head, cells, tokenizer, x, fit_rows, cfg)
            penalty = self._fit_readout(model, z, y, train, val, lambda m: predictions(m, val))
        else:
            start_at_mean(model, y[train].mean(0), self.modality)
        if closed_form:
            model.eval()
            self.model, self.validation = model, validate(model)[1]  # scored on held-out cells, then refitted on all
            self.validation["refitted_on_all_cells"] = True
            self._plot_data = {"true": y[val], "pred": predictions(model, val), "names": names,
                               "baseline": mean_prediction}  # before the refit
            self._fit_readout(model, z, y, fit_rows, None, None, penalty)
        else:
            def make_batch(rows):
                sel = train[rows]
                batch = model_batch(cells, sel, tokenizer)
                batch["targets"] = torch.from_numpy(y[sel])
                batch.update({k: torch.from_numpy(v[sel]) for k, v in extra.items()})
                return batch

            protein = self.modality == "protein"  # the score validate returns: -rmse, or the per-peak AUROC
            self.model, self.validation = fit(model, len(train), make_batch, validate, cfg,
                                              description=f"modality ({self.modality})",
                                              metric="rmse" if protein else "auroc_per_feature", lower_is_better=protein,
                                              start_is_candidate=cfg.readout == "linear")
            self._plot_data = {"true": y[val], "pred": predictions(self.model, val), "names": names,
                               "baseline": mean_prediction}
        return self.validation

    def _fit_readout(self, model, z, y, rows, val, predict_val, penalty: float | None = None) -> float | None:
        """Fit the linear readout on ``rows`` in closed form: RidgeCV (alpha by leave-one-out, as the ridge
        baseline) for protein; for ATAC, per-peak logistic regressions whose penalty is ``penalty`` or, given
        ``predict_val`` (model -> predictions on ``val``), chosen among :data:`ATAC_PENALTIES` on the validation
        cells by the one-standard-error rule (see :func:`one_standard_error_choice`). Returns the ATAC penalty."""
        if self.modality == "protein":
            fit_ridge_readout(model.head, z[rows], y[rows])
            return None
        if penalty is not None:
            fit_per_feature_logistic_readout(model.head, z[rows], y[rows], self.config.seed, c=penalty)
            return penalty
        predictions = []
        for c in ATAC_PENALTIES:
            fit_per_feature_logistic_readout(model.head, z[rows], y[rows], self.config.seed, c=c)
            predictions.append(predict_val(model))
        chosen, scores, se = one_standard_error_choice(y[val], predictions, self.config.seed)
        c = ATAC_PENALTIES[chosen]
        fit_per_feature_logistic_readout(model.head, z[rows], y[rows], self.config.seed, c=c)
        logger.info(f"ATAC readout: inverse penalty C={c} (validation AUROC {scores[chosen]:.4f}, best "
                    f"{max(scores):.4f} +- {se:.4f}; tried {ATAC_PENALTIES})")
        return c

    def _metrics(self, true: np.ndarray, pred: np.ndarray) -> dict:
        return protein_metrics(true, pred) if self.modality == "protein" else atac_metrics(true, pred)

    # ------------------------------------------------------------------ inference

    def predict(self, adata: ad.AnnData, source: str = "data") -> np.ndarray:
        """(cells, features) predictions (CLR or accessibility probability) from RNA alone; NaN for cells
        without any vocabulary gene."""
        model = self._inference_model()
        out = np.full((adata.n_obs, len(self.model.config.feature_names)), np.nan, dtype=np.float32)
        for rows, pred in iter_model_outputs(model, adata, self.tokenizer, layer=self.layer, gene_key=self.gene_key,
                                             source=source, chunk_size=self.config.chunk_size,
                                             outputs=lambda o: o.extras["predictions"],
                                             extra=self._model_extra(adata, source)):
            out[rows] = pred
        return out

    def write_outputs(self, adata: ad.AnnData, target: ad.AnnData, *, key_added: str | None = None, source: str = "data") -> None:
        """Write predictions into ``target.obsm[key_added]`` and names into ``target.uns[key_added + '_names']``,
        and their provenance into ``target.uns['atlasformer']``."""
        key = key_added or self.key_added
        predicted = self.predict(adata, source=source)
        with self._recording_provenance(target):
            target.obsm[key] = predicted
            target.uns[f"{key}_names"] = np.asarray(self.model.config.feature_names, dtype=object)

    def plots(self, output: Path) -> list[Path]:
        """Protein: predicted vs observed CLR per protein; ATAC: ROC curve (validation cells)."""
        if self._plot_data is None:
            return []
        true, pred, names = self._plot_data["true"], self._plot_data["pred"], self._plot_data["names"]
        if self.modality == "protein":
            path = Path(output) / "protein_predicted_vs_observed.png"
            predicted_vs_observed(true, pred, names, path, xlabel="observed CLR", ylabel="predicted CLR",
                                  feature_kind="proteins", baseline=self._plot_data.get("baseline"),
                                  baseline_label="mean of training cells")
            return [path]
        path = Path(output) / "atac_roc.png"
        roc_curve_plot(true, pred, path, "ATAC accessibility (validation cells)")
        return [path]


    @classmethod
    def _keys_from_model(cls, model, keys: dict) -> dict:
        return {**{k: v for k, v in keys.items() if k != "modality"}, "modality": model.config.modality}

def predict_modality(adata: ad.AnnData, model, *, key_added: str | None = None, layer: str | None = None,
                     gene_key: str | None = None, copy: bool = False) -> ad.AnnData | None:
    """Predict protein or ATAC from RNA with a fine-tuned modality model.

    Parameters
    ----------
    adata
        Raw RNA counts (``X`` or ``layers[layer]``).
    model
        A fine-tuned modality folder, hub id, or :class:`ModalityPredictor`.
    key_added
        Writes ``obsm[key_added]`` and ``uns[key_added + '_names']`` (default ``protein_predicted`` or
        ``atac_predicted``).
    copy
        Return an annotated copy instead of writing into ``adata``.
    """
    return ModalityPredictor.apply(adata, model, copy=copy, layer=layer, gene_key=gene_key, key_added=key_added)
