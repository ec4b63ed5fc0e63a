"""Imputation / denoising: every gene's expected expression from the cell embedding and library size.

The model (:class:`~atlasformer.model_zoo.task_heads.CellTransformerForImputation`) decodes the cell
embedding and log library size into each gene's share of the library, trained with a negative-binomial
(or ZINB) likelihood of the counts. Training and validation follow molecular cross-validation
(BENCHMARKS.md section 3): counts are thinned binomially into ``x_train`` (90 %) and ``x_test``; the
model sees only ``x_train`` and is scored on the validation cells' ``x_test`` (Poisson NLL per test count,
Pearson of log1p), beside the ``no_denoising`` baseline on the same cells.

Writes ``layers['atlasformer_denoised']`` (``key_added``): expected expression in counts per 10,000
(CP10k) for every gene of the file the model predicts (NaN for genes it was not trained on, and for cells
without any vocabulary gene).
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from atlasformer.model_zoo import CellTransformerForImputation
from atlasformer.tokenization import InputError

from .common import (
    FinetunedTask,
    build_task_model,
    frozen_embeddings,
    iter_model_outputs,
    load_backbone,
    model_batch,
    model_gene_keys,
    read_counts,
    run_model,
    split_cells,
    tokenize_for_model,
)
from .config import FinetuneConfig
from .expression import expression_setup, fit_expression_path, path_features, standardise_embedding
from .fit import fit
from .metrics import binomial_thinning, imputation_metrics, row_normalised
from .plots import metric_bars, predicted_vs_observed

logger = logging.getLogger(__name__)

KEY_ADDED = "atlasformer_denoised"
THINNING = 0.9  # fraction of molecules the model sees (BENCHMARKS.md)


class Imputer(FinetunedTask):
    """Fine-tunes and applies a denoising model (the task's user-facing model).

    Parameters
    ----------
    model
        Pretrained model folder or hub id; ignored with ``config.from_scratch``.
    config
        Fine-tuning settings (``likelihood`` is this task's: ``"nb"`` or ``"zinb"``).
    layer, gene_key
        Where counts and gene identifiers are.
    batch_key
        obs column with batches (needed for ``config.val_batch``).
    """

    model_class = CellTransformerForImputation
    recipe = {"mode": "frozen", "lr": 2e-3, "readout": "linear", "expression_genes": 2000, "expression_pcs": 50,
              "epochs": 50, "embedding_weight": 1.0}
    """Defaults of the fields a FinetuneConfig leaves at None, chosen by measurement (docs/model_quality.md)."""

    def __init__(self, model=None, config: FinetuneConfig | None = None, *, layer: str | None = None,
                 gene_key: str | None = None, batch_key: str | None = None):
        self.model_source = model
        self.config = (config or FinetuneConfig()).with_recipe(self.recipe)
        self.layer, self.gene_key, self.batch_key = layer, gene_key, batch_key
        self.model: CellTransformerForImputation | None = None
        self.tokenizer = None
        self.validation: dict = {}
        self._plot_data: dict | None = None

    # ------------------------------------------------------------------ training
    def fit(self, adata: ad.AnnData, source: str = "data") -> dict:
        """Fine-tune on the thinned counts of ``adata``; returns MCV metrics on the validation cells."""
        cfg = self.config
        counts = read_counts(adata, self.layer, source)
        x_train, x_test = binomial_thinning(counts, THINNING, seed=cfg.seed)
        thinned = ad.AnnData(x_train, obs=pd.DataFrame(index=adata.obs_names.astype(str)), var=adata.var.copy())
        if self.batch_key and self.batch_key in adata.obs:
            thinned.obs[self.batch_key] = adata.obs[self.batch_key].to_numpy()
        backbone, self.tokenizer, config = load_backbone(self.model_source, cfg, [adata], gene_key=self.gene_key)
        data = tokenize_for_model(thinned, self.tokenizer, gene_key=self.gene_key, source=f"{source} (90% thinned)")
        cells, tokenizer = data.cells, self.tokenizer
        targets, held_out = x_train[cells.cell_index], x_test[cells.cell_index]  # (cells, genes) CSR, rows as cells
        library = np.asarray(targets.sum(1)).ravel().astype(np.float32)
        genes = list(model_gene_keys(adata, self.tokenizer, self.gene_key, source))
        train, val = split_cells(data.obs, cfg, self.batch_key)
        if len(val) == 0:
            raise InputError("imputation is validated on held-out cells: set val_fraction > 0 or val_batch.")
        head, expression = expression_setup(thinned, tokenizer, cfg, cells.cell_index[train], gene_key=self.gene_key,
                                            source=source)
        head.pop("readout")  # the count decoder is this task's head
        model = build_task_model(CellTransformerForImputation, backbone, config, seed=cfg.seed, cpu=cfg.cpu,
                                 feature_names=genes, likelihood=cfg.likelihood, task="imputation", **head)
        extra = {"library_size": library}
        if expression is not None:
            extra["expression"] = expression[cells.cell_index]  # (cells, genes), rows as cells
            fit_expression_path(model.expression_path, extra["expression"][train], cfg.seed)
        if cfg.mode == "frozen":  # the backbone's embeddings, computed once: training touches only the decoder
            extra["cell_embedding"] = frozen_embeddings(model.backbone, cells, tokenizer)  # (cells, d_model)
            if model.features is not None:
                standardise_embedding(model.features, extra["cell_embedding"][train], cfg.use_embedding,
                                      features=path_features(model.expression_path, extra["expression"][train]),
                                      weight=cfg.embedding_weight)
        baseline = imputation_metrics(row_normalised(targets[val]), held_out[val], targets[val])

        def make_batch(rows):
            sel = train[rows]
            batch = {} if cfg.mode == "frozen" else model_batch(cells, sel, tokenizer)
            batch.update({k: torch.from_numpy(v[sel]) for k, v in extra.items()})
            batch["counts"] = torch.from_numpy(targets[sel].toarray())
            return batch

        def proportions(m, rows):
            return run_model(m, cells, tokenizer, rows=rows, outputs=lambda out: out.extras["proportions"], **extra)

        def validate(m):
            metrics = imputation_metrics(proportions(m, val), held_out[val], targets[val])
            metrics.update(no_denoising=baseline, n_train=int(len(train)), n_val=int(len(val)))
            return -metrics["poisson_nll"], metrics

        self.model, self.validation = fit(model, len(train), make_batch, validate, cfg, description="imputation",
                                          metric="poisson_nll", lower_is_better=True)
        self._plot_data = {"proportions": proportions(self.model, val), "x_test": held_out[val], "genes": genes}
        return self.validation

    # ------------------------------------------------------------------ inference

    def predict(self, adata: ad.AnnData, source: str = "data") -> np.ndarray:
        """(cells, genes of ``adata``) expected expression in CP10k; NaN where the model has no prediction."""
        model = self._inference_model()
        features = list(self.model.config.feature_names)
        keys = model_gene_keys(adata, self.tokenizer, self.gene_key, source)
        position = feature_positions(features, keys)
        known = position >= 0
        if not known.any():
            raise InputError(f"{source}: none of its genes is one the model predicts (e.g. {list(keys[:3])}); "
                             "use the gene identifiers of the training data (or --gene-key).")
        if not known.all():
            logger.warning(f"{source}: {int((~known).sum())} of its {len(keys)} genes were not in training "
                           f"(e.g. {list(keys[~known][:5])}); their denoised values are NaN.")
        out = np.full((adata.n_obs, adata.n_vars), np.nan, dtype=np.float32)
        for rows, props in iter_model_outputs(model, adata, self.tokenizer, layer=self.layer, gene_key=self.gene_key,
                                              source=source, chunk_size=self.config.chunk_size,
                                              outputs=lambda o: o.extras["proportions"], extra=self._model_extra(adata, source)):
            block = np.full((len(rows), adata.n_vars), np.nan, dtype=np.float32)
            block[:, known] = props[:, position[known]] * 1e4
            out[rows] = block
        return out

    def _model_extra(self, adata: ad.AnnData, source: str) -> dict:
        """The library size of every cell (the count decoder's scale), and the expression path's input."""
        library = np.asarray(read_counts(adata, self.layer, source).sum(1)).ravel().astype(np.float32)
        return {"library_size": library, **(super()._model_extra(adata, source) or {})}

    def write_outputs(self, adata: ad.AnnData, target: ad.AnnData, *, key_added: str = KEY_ADDED, source: str = "data") -> None:
        """Write denoised CP10k expression of ``adata`` into ``target.layers[key_added]``, and its provenance into
        ``target.uns['atlasformer']``."""
        denoised = self.predict(adata, source=source)
        with self._recording_provenance(target):
            target.layers[key_added] = denoised

    def plots(self, output: Path) -> list[Path]:
        """MCV metrics against no denoising, and predicted vs held-out counts of the most expressed genes."""
        if self._plot_data is None:
            return []
        output = Path(output)
        v = self.validation
        bars = {"atlasformer": {k: v[k] for k in ("poisson_nll", "pearson_log1p")},
                "no_denoising": {k: v["no_denoising"][k] for k in ("poisson_nll", "pearson_log1p")}}
        paths = [output / "imputation_mcv.png", output / "denoised_vs_heldout.png"]
        metric_bars(bars, paths[0], "molecular cross-validation (validation cells)", lower_is_better=("poisson_nll",))
        props, x_test, genes = self._plot_data["proportions"], self._plot_data["x_test"], self._plot_data["genes"]
        top = np.argsort(-np.asarray(x_test.sum(0)).ravel())[:8]
        expected = props[:, top] * np.asarray(x_test.sum(1))
        predicted_vs_observed(np.log1p(x_test[:, top].toarray()), np.log1p(expected), [genes[i] for i in top], paths[1],
                              xlabel="log1p held-out count", ylabel="log1p predicted",
                              title=f"the {len(top)} most expressed of {len(genes)} genes (validation cells)")
        return paths


def feature_positions(features: list, keys: pd.Index) -> np.ndarray:
    """The model's output column for each of a file's gene keys (-1: none). The training file itself maps
    column to column; elsewhere a key shared by several genes (two symbols of one Ensembl ID) takes the first
    such column, and a gene without an identifier (None) matches nothing."""
    if len(keys) == len(features) and all(a == b for a, b in zip(keys, features, strict=True)):
        return np.arange(len(keys))
    names = pd.Index(np.asarray(features, dtype=object))
    first = ~names.duplicated(keep="first") & names.notna()
    position = pd.Index(names[first]).get_indexer(keys)
    return np.where(position >= 0, np.flatnonzero(first)[position], -1)


def denoise(adata: ad.AnnData, model, *, key_added: str = KEY_ADDED, layer: str | None = None,
            gene_key: str | None = None, copy: bool = False) -> ad.AnnData | None:
    """Denoised expression (CP10k) from a fine-tuned imputation model into ``layers[key_added]``.

    Parameters
    ----------
    adata
        Raw counts (``X`` or ``layers[layer]``).
    model
        A fine-tuned imputation folder, hub id, or :class:`Imputer`.
    key_added
        Writes ``layers[key_added]`` (default ``atlasformer_denoised``).
    copy
        Return an annotated copy instead of writing into ``adata``.
    """
    return Imputer.apply(adata, model, copy=copy, layer=layer, gene_key=gene_key, key_added=key_added)
