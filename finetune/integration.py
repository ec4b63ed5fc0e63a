"""Batch integration: a batch-invariant cell embedding, fine-tuned without labels.

The model (:class:`~atlasformer.model_zoo.task_heads.CellTransformerForIntegration`) is trained on
masked-value objectives whose decoders receive each cell's batch token (token outputs predict masked
values; the cell embedding predicts the counts of the highly variable genes under a negative binomial,
so biology stays in the embedding) and on an adversarial batch discriminator behind gradient reversal
(scGPT's DAB), which pushes batch out of the embedding. The encoder never sees the batch, so cells of
new batches embed as well. Labels are never used for training; given ``labels_key`` they score the
result with scib-metrics.

Writes ``obsm['X_atlasformer_integrated']`` (``key_added``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from atlasformer.model_zoo import CellTransformerForIntegration
from atlasformer.pretrain.objectives import mask_batch
from atlasformer.tokenization import InputError
from atlasformer.tokenization.anndata_io import check_obs_key

from .baselines import harmony
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
from .metrics import batch_mixing_entropy, scib_scores
from .plots import metric_bars, umap_panels

logger = logging.getLogger(__name__)

KEY_ADDED = "X_atlasformer_integrated"


def highly_variable(counts: sp.csr_matrix, n_top: int = 2000) -> np.ndarray:
    """Boolean mask of the ``n_top`` HVGs (scanpy, flavor "seurat", on log-normalised counts; all if fewer)."""
    import scanpy as sc

    if counts.shape[1] <= n_top:
        return np.ones(counts.shape[1], dtype=bool)
    work = ad.AnnData(counts.copy())
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    sc.pp.highly_variable_genes(work, n_top_genes=n_top, flavor="seurat")
    return work.var["highly_variable"].to_numpy()


def log_normalised_pcs(counts: sp.csr_matrix, hvg: np.ndarray, *, n_comps: int = 50, seed: int = 0) -> np.ndarray:
    """PCs of log-normalised HVGs (BENCHMARKS.md): the unintegrated embedding integration is compared with."""
    import scanpy as sc

    work = ad.AnnData(counts.copy())
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    x = work.X[:, np.flatnonzero(hvg)]
    n_comps = min(n_comps, x.shape[0] - 1, x.shape[1] - 1)
    return sc.pp.pca(x, n_comps=n_comps, random_state=seed).astype(np.float32)


class Integrator(FinetunedTask):
    """Fine-tunes and applies a batch-integration model (the task's user-facing model).

    Parameters
    ----------
    model
        Pretrained model folder or hub id; ignored with ``config.from_scratch``.
    config
        Fine-tuning settings (``mask_ratio`` and ``dab_weight`` are this task's).
    batch_key
        obs column with the batches to integrate (required). On new data (``embed``, ``predict``) it names the
        query's batches, which Harmony corrects over when the model was fitted with ``harmony``.
    labels_key
        obs column with cell types, used only to score the result (scib-metrics) and colour plots.
    layer, gene_key
        Where counts and gene identifiers are.
    scib_disable
        scib-metrics metrics to switch off (reported in the metrics), e.g. ``("kbet_per_label",)``.
    """

    model_class = CellTransformerForIntegration
    required_keys = ("batch_key",)
    prediction_keys = ("batch_key",)  # Harmony corrects over the batches of the cells it embeds
    recipe = {"mode": "frozen", "lr": 3e-4, "readout": "linear", "expression_genes": 2000, "expression_pcs": 50,
              "harmony": True, "embedding_weight": 0.1}
    """Defaults of the fields a FinetuneConfig leaves at None, chosen by measurement (docs/model_quality.md)."""

    def __init__(self, model=None, config: FinetuneConfig | None = None, *, batch_key: str = "batch",
                 labels_key: str | None = None, layer: str | None = None, gene_key: str | None = None,
                 scib_disable: tuple[str, ...] = ()):
        self.model_source = model
        self.config = (config or FinetuneConfig()).with_recipe(self.recipe)
        self.batch_key, self.labels_key, self.layer, self.gene_key = batch_key, labels_key, layer, gene_key
        self.scib_disable = tuple(scib_disable)
        self.model: CellTransformerForIntegration | None = None
        self.tokenizer = None
        self.validation: dict = {}
        self._plot_data: dict | None = None

    # ------------------------------------------------------------------ training
    def fit(self, adata: ad.AnnData, source: str = "data") -> dict:
        """Fine-tune on all cells of ``adata`` (no labels); returns validation metrics and, with
        ``labels_key``, scib-metrics scores of the integrated and the unintegrated (PCA) embedding."""
        if not self.batch_key:
            raise InputError("integration needs batch_key: the obs column naming each cell's batch (--batch-key).")
        check_obs_key(adata.obs, self.batch_key, source=source, what="batch_key")
        check_obs_key(adata.obs, self.labels_key, source=source)
        cfg = self.config
        backbone, self.tokenizer, config = load_backbone(self.model_source, cfg, [adata], gene_key=self.gene_key)
        if config.value_encoding == "none":
            raise InputError("integration trains masked-value objectives: use a model with a binned or continuous "
                             "tokenizer (rank-value models carry no values), or from_scratch=true.")
        data = tokenize_for_model(adata, self.tokenizer, layer=self.layer, gene_key=self.gene_key, source=source)
        names = sorted(data.obs[self.batch_key].astype(str).unique())
        if len(names) < 2:
            raise InputError(f"{source}: obs[{self.batch_key!r}] has one batch; integration needs at least 2.")
        batch_ids = pd.Categorical(data.obs[self.batch_key].astype(str), categories=names).codes.astype(np.int64)
        counts = read_counts(adata, self.layer, source)
        hvg = highly_variable(counts)
        panel = counts[data.cells.cell_index][:, np.flatnonzero(hvg)].tocsr()  # (cells, HVGs), rows as data.cells
        train, val = split_cells(data.obs, cfg, self.batch_key)
        if len(val) == 0:
            val = train
        cells, tokenizer = data.cells, self.tokenizer
        head, expression = expression_setup(adata, tokenizer, cfg, cells.cell_index[train], layer=self.layer,
                                            gene_key=self.gene_key, source=source)
        head.pop("readout")
        model = build_task_model(CellTransformerForIntegration, backbone, config, seed=cfg.seed, cpu=cfg.cpu,
                                 batch_names=names,
                                 feature_names=list(model_gene_keys(adata, self.tokenizer, self.gene_key)[hvg]),
                                 dab_weight=cfg.dab_weight, adversary=cfg.adversary, harmony=cfg.harmony,
                                 task="integration", value_head="bins" if config.value_encoding == "category" else "mse",
                                 **head)
        if expression is not None:
            x = expression[cells.cell_index]  # (cells, genes), rows as cells
            fit_expression_path(model.expression_path, x[train], cfg.seed)
            standardise_embedding(model.features, frozen_embeddings(model.backbone, cells, tokenizer)[train], cfg.use_embedding,
                                  features=path_features(model.expression_path, x[train]), weight=cfg.embedding_weight)
        if cfg.mode == "frozen":  # the pretrained embedding as it is, beside the PCs
            model.eval()
            self.model = model
            self.validation = {**self.score(adata, source=source), "n_train": int(len(train)), "n_val": int(len(val))}
            return self.validation
        generator = torch.Generator().manual_seed(cfg.seed)

        def masked(rows, gen):
            batch = model_batch(cells, rows, tokenizer)
            batch["batch_labels"] = torch.from_numpy(batch_ids[rows])
            batch["counts"] = torch.from_numpy(panel[rows].toarray())
            batch = mask_batch(batch, mask_ratio=cfg.mask_ratio, mask_value=model.config.mask_value,
                               mask_token_id=tokenizer.vocab.mask_id, mask_genes=False, generator=gen)
            batch.pop("gene_targets")
            return batch

        def make_batch(rows):
            return masked(train[rows], generator)

        def validate(m):
            device = next(m.parameters()).device
            gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same masks at every validation
            sums: dict[str, float] = {}
            for start in range(0, len(val), 64):
                sel = val[start : start + 64]
                out = m(**{k: v.to(device) for k, v in masked(sel, gen).items()})
                for name, term in out.loss_terms.items():
                    sums[name] = sums.get(name, 0.0) + float(term) * len(sel)
            metrics = {f"val_{k}": v / len(val) for k, v in sums.items()}
            emb = run_model(m, cells, tokenizer, rows=val)
            metrics["val_batch_mixing_entropy"] = batch_mixing_entropy(emb, batch_ids[val])
            metrics.update(n_train=int(len(train)), n_val=int(len(val)))
            # higher is better: the reconstruction losses on held-out cells (the adversary is no quality score)
            return -(metrics["val_masked_value"] + metrics["val_expression"]), metrics

        self.model, self.validation = fit(model, len(train), make_batch, validate, cfg, description="integration",
                                          metric="reconstruction loss (val_masked_value + val_expression)",
                                          lower_is_better=True)
        self.validation = {**self.validation, **self.score(adata, source=source)}
        return self.validation

    def embed(self, adata: ad.AnnData, source: str = "data") -> np.ndarray:
        """(cells, dims) integrated embeddings: [PCs; scaled embedding] with the expression path, else the cell
        embedding; batch-corrected by Harmony over ``adata``'s cells when the model was fitted with ``harmony`` and
        ``batch_key`` is in ``adata.obs`` (Harmony corrects the cells it is given, as scanpy's ``harmony_integrate``)."""
        model = self._inference_model()
        if self.model.expression_path is None:
            out = super().embed(adata, source=source)
        else:
            dims = self.model.expression_path.out_features + self.model.config.d_model
            out = np.zeros((adata.n_obs, dims), dtype=np.float32)
            for rows, joint in iter_model_outputs(model, adata, self.tokenizer, layer=self.layer,
                                                  gene_key=self.gene_key, source=source,
                                                  chunk_size=self.config.chunk_size,
                                                  outputs=lambda o: o.extras["joint_features"],
                                                  extra=self._model_extra(adata, source)):
                out[rows] = joint
        if self.model.config.harmony and self.batch_key in adata.obs:
            out = harmony(out, adata.obs[self.batch_key].astype(str).to_numpy(), seed=self.config.seed)
        elif self.model.config.harmony:  # any batches are corrected, seen in training or not; none is no correction
            logger.warning(f"{source}: obs has no batch column {self.batch_key!r}, so the integrated embedding is not "
                           "corrected by Harmony; name the query's batch column with batch_key= (--batch-key).")
        return out

    def score(self, adata: ad.AnnData, source: str = "data") -> dict:
        """Batch mixing and (with ``labels_key``) scib-metrics scores of the integrated embedding and of the
        unintegrated PCs of log-normalised HVGs."""
        integrated = self.embed(adata, source=source)
        counts = read_counts(adata, self.layer, source)
        unintegrated = log_normalised_pcs(counts, highly_variable(counts), seed=self.config.seed)
        batch = adata.obs[self.batch_key].astype(str).to_numpy()
        embeddings = {"unintegrated_pca": unintegrated, "atlasformer": integrated}
        self._plot_data = {"embeddings": embeddings, "obs": adata.obs}
        mixing = {k: batch_mixing_entropy(v, batch) for k, v in embeddings.items()}
        result = {"batch_mixing_entropy": mixing["atlasformer"], "batch_mixing_entropy_unintegrated": mixing["unintegrated_pca"]}
        if self.labels_key is None:
            return result
        labels = adata.obs[self.labels_key].astype(str).to_numpy()
        known = (labels != "nan") & pd.notna(adata.obs[self.labels_key]).to_numpy()
        scores = scib_scores({k: v[known] for k, v in embeddings.items()}, batch[known], labels[known],
                             pre_integrated=unintegrated[known], disable=self.scib_disable)
        result["scib"] = scores["methods"]
        result.update({f"scib_{k}": scores["methods"]["atlasformer"][k] for k in ("bio_conservation", "batch_correction", "total")})
        result["scib_disabled"] = scores["disabled"]
        result["scib_cells"] = int(known.sum())
        return result

    # ------------------------------------------------------------------ inference

    def predict(self, adata: ad.AnnData, source: str = "data") -> np.ndarray:
        """The integrated embeddings of :meth:`embed` (Harmony-corrected over ``obs[batch_key]`` when the model
        uses Harmony; the encoder itself needs no batch); zeros for cells without vocabulary genes."""
        return self.embed(adata, source=source)

    def write_outputs(self, adata: ad.AnnData, target: ad.AnnData, *, key_added: str = KEY_ADDED, source: str = "data") -> None:
        """Write the integrated embedding of ``adata`` into ``target.obsm[key_added]``, and its provenance into
        ``target.uns['atlasformer']``."""
        embedding = self.embed(adata, source=source)
        with self._recording_provenance(target):
            target.obsm[key_added] = embedding

    def plots(self, output: Path) -> list[Path]:
        """UMAPs of the unintegrated PCs and the integrated embedding, by batch and by cell type; scib bars."""
        if self._plot_data is None:
            return []
        output = Path(output)
        embeddings, obs = self._plot_data["embeddings"], self._plot_data["obs"]
        paths = [output / "umap_batch.png"]
        umap_panels(embeddings, obs, self.batch_key, paths[-1], seed=self.config.seed)
        if self.labels_key:
            paths.append(output / "umap_cell_type.png")
            umap_panels(embeddings, obs, self.labels_key, paths[-1], seed=self.config.seed)
        if "scib" in self.validation:
            aggregates = {m: {k: v[k] for k in ("bio_conservation", "batch_correction", "total")}
                          for m, v in self.validation["scib"].items()}
            paths.append(output / "scib_scores.png")
            metric_bars(aggregates, paths[-1], "scib-metrics (not min-max scaled)")
        return paths


def integrate(adata: ad.AnnData, model, *, key_added: str = KEY_ADDED,
              layer: str | None = None, gene_key: str | None = None, copy: bool = False) -> ad.AnnData | None:
    """Batch-invariant embeddings from a fine-tuned integration model into ``obsm[key_added]``.

    Parameters
    ----------
    adata
        Raw counts (``X`` or ``layers[layer]``).
    model
        A fine-tuned integration folder, hub id, or :class:`Integrator`.
    key_added
        Writes ``obsm[key_added]`` (default ``X_atlasformer_integrated``).
    copy
        Return an annotated copy instead of writing into ``adata``.
    """
    return Integrator.apply(adata, model, copy=copy, layer=layer, gene_key=gene_key, key_added=key_added)
