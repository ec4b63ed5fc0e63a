"""AnnData-facing scVI, totalVI and scANVI: set up from keys, train with the shared fit loop, embed, predict, save,
load, and map a query onto a reference (scArches surgery).

As scvi-tools' ``model/`` wraps its ``module/``, :class:`SCVIModel`, :class:`TOTALVIModel` and
:class:`SCANVIModel` know AnnData (count layer, batch and label keys, gene and protein names) and hand tensors
to the torch modules in ``atlasformer.model_zoo.vae``. Training uses :func:`atlasformer.finetune.fit` with
scvi-tools' training plan: Adam (lr 1e-3, weight decay 1e-6, eps 0.01), constant learning rate, batches of 128,
10% of cells for validation (chosen by :func:`~atlasformer.finetune.common.split_cells`, as for every task), and
the KL weight warmed up linearly over 400 epochs (scVI, scANVI) or over 0.75 x n_cells steps (totalVI, lr 4e-3,
batches of 256, early stopping after 45 epochs without improvement). The KL weight is passed with each batch, so
the loop itself needs nothing VAE-specific. scANVI trains from scratch, or for a few epochs from a fitted scVI
model (scvi-tools' recommended recipe). :meth:`SCVIModel.map_query` and :meth:`SCANVIModel.map_query` add a
query's batches to a fitted reference and train only their new one-hot columns (scArches). The wrappers
implement the task contract, :class:`~atlasformer.finetune.task.Task`.

Outputs written by ``write_outputs``: ``obsm['X_<key_added>']`` (posterior mean latent), and for scVI
``layers['<key_added>_denoised']`` (expected expression, CP10k); for totalVI ``obsm['protein_predicted']``
(expected protein counts on the CLR scale) and ``uns['protein_predicted_names']``; for scANVI
``obs['<key_added>_label']`` and ``obs['<key_added>_confidence']`` (predicted label, its probability).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from atlasformer.checkpoints import load_vae_folder, resolve_model, save_vae_folder
from atlasformer.model_zoo.vae import (
    NewBatchColumnsOnly,
    SCANVIConfig,
    SCANVIModule,
    SCVIConfig,
    SCVIModule,
    TOTALVIConfig,
    TOTALVIModule,
    with_new_batches,
)
from atlasformer.tokenization import BatchOrder, InputError, check_counts
from atlasformer.tokenization.anndata_io import check_obs_key, count_matrix, to_csr

from .common import split_cells
from .config import FinetuneConfig
from .fit import fit
from .metrics import clr


def max_epochs_heuristic(n_cells: int, cap: int = 400) -> int:
    """scvi-tools' default epochs: ``min(round(20000 / n_cells * 400), 400)``."""
    return max(1, min(round(20_000 / max(n_cells, 1) * cap), cap))


def vae_training_config(n_cells: int, *, epochs: int | None = None, seed: int = 0, lr: float = 1e-3,
                        batch_size: int = 128, patience: int | None = None) -> FinetuneConfig:
    """scvi-tools' training plan as a :class:`FinetuneConfig` for the shared loop (all VAE weights are "head")."""
    epochs = epochs or max_epochs_heuristic(n_cells)
    return FinetuneConfig(epochs=epochs, batch_size=batch_size, lr=lr, head_lr=lr, weight_decay=1e-6, optimizer="adam",
                          adam_eps=0.01, schedule="constant", clip_grad=0.0, val_fraction=0.1,
                          patience=patience or epochs + 1, seed=seed, class_weighting=False)


def counts_for_genes(adata: ad.AnnData, genes: list[str] | None, *, layer: str | None = None,
                     source: str = "data") -> sp.csr_matrix:
    """Checked float32 CSR counts with columns in the order of ``genes`` (absent genes are zero columns)."""
    counts = to_csr(count_matrix(adata, layer))
    check_counts(counts, source=source, layer=layer)
    if genes is None or list(adata.var_names) == list(genes):
        return counts
    position = pd.Index(adata.var_names).get_indexer(genes)
    found = position >= 0
    if not found.any():
        raise InputError(f"{source}: none of the model's {len(genes)} genes is in var_names; "
                         "the data uses other gene identifiers than the training file.")
    if not found.all():
        warnings.warn(f"{source}: {int((~found).sum())} of the model's {len(genes)} genes are absent; they are "
                      "treated as zero counts.", stacklevel=3)
    select = sp.csr_matrix((np.ones(found.sum(), dtype=np.float32), (position[found], np.flatnonzero(found))),
                           shape=(adata.n_vars, len(genes)))
    return (counts @ select).tocsr()


def query_counts(query: ad.AnnData, genes: list[str], *, layer: str | None = None,
                 source: str = "query") -> sp.csr_matrix:
    """The reference genes' counts in ``query``, refusing a query that lacks any of them (surgery keeps the
    reference encoder, whose inputs are exactly those genes)."""
    missing = pd.Index(genes).difference(pd.Index(map(str, query.var_names)))
    if len(missing):
        raise InputError(
            f"{source}: the query lacks {len(missing)} of the reference model's {len(genes)} genes (e.g. "
            f"{list(missing[:5])}), so it has a different gene set from the reference. Use the reference's "
            "gene identifiers in var_names (model.genes lists them); genes truly not measured in the query can be "
            "added as zero-count columns (as scvi-tools' prepare_query_anndata does). Extra query genes are ignored.")
    return counts_for_genes(query, genes, layer=layer, source=source)


def check_cells_have_counts(counts: sp.csr_matrix, source: str, what: str) -> None:
    """Refuse cells without counts in the modelled genes (the library size scales the likelihood's mean)."""
    empty = np.asarray(counts.sum(1)).ravel() == 0
    if empty.any():
        raise InputError(f"{source}: {int(empty.sum())} cells have no counts in the modelled genes; "
                         f"filter them (sc.pp.filter_cells(adata, min_counts=1)) before training {what}.")


def batch_codes(obs: pd.DataFrame, batch_key: str | None, categories: list[str] | None, source: str) -> np.ndarray:
    """Integer batch codes (cells,) for ``obs[batch_key]`` in the order of ``categories``; zeros without a key."""
    if batch_key is None:
        return np.zeros(len(obs), dtype=np.int64)
    check_obs_key(obs, batch_key, source=source, what="batch_key")
    values = obs[batch_key].astype(str).to_numpy()
    codes = pd.Index(categories).get_indexer(values)
    if (codes < 0).any():
        unseen = sorted(set(values[codes < 0]))[:5]
        raise InputError(f"{source}: obs[{batch_key!r}] has batches the model was not trained on ({unseen}); "
                         f"known: {categories[:10]}. Train on all batches (scVI conditions its decoder on them), "
                         "or map the query onto the model first: model.map_query(query) (scArches surgery).")
    return codes.astype(np.int64)


def on_device(inputs: dict, module: torch.nn.Module) -> dict:
    """Move a batch's tensors to the module's device (training may have put it on a GPU)."""
    device = next(module.parameters()).device
    return {k: v.to(device) for k, v in inputs.items()}


class _VAEModel:
    """What scVI and totalVI wrappers share: keys, the training call, chunked inference, save and load."""

    module_classes: dict = {}
    default_key = "vae"

    def __init__(self, *, batch_key: str | None = None, layer: str | None = None, epochs: int | None = None,
                 seed: int = 0, config: FinetuneConfig | None = None, **module_kwargs):
        self.batch_key, self.layer, self.epochs, self.seed = batch_key, layer, epochs, seed
        self.config = config
        self.module_kwargs = module_kwargs
        self.module = None
        self.genes: list[str] | None = None
        self.batches: list[str] = ["all"]
        self.validation: dict = {}
        self.validation_rows = np.array([], dtype=np.int64)  # positions of the last fit's validation cells
        self.history: list[float] = []

    # ------------------------------------------------------------------ setup
    def _setup_batches(self, adata: ad.AnnData, source: str) -> np.ndarray:
        if self.batch_key is not None:
            check_obs_key(adata.obs, self.batch_key, source=source, what="batch_key")
            self.batches = sorted(adata.obs[self.batch_key].astype(str).unique())
        return batch_codes(adata.obs, self.batch_key, self.batches, source)

    def _require_module(self):
        if self.module is None:
            raise InputError(f"this {type(self).__name__} has no trained model yet: call fit(adata) or load(folder).")

    # ------------------------------------------------------------------ training
    def _train(self, obs: pd.DataFrame, make_inputs: Callable[[np.ndarray, float], dict],
               kl_weight_at: Callable[[int, int], float], lr: float, batch_size: int, patience: int | None,
               description: str, epochs: int | None = None, overrides: dict | None = None) -> dict:
        """Train ``self.module`` with the shared loop on the cells of ``obs``; ``make_inputs(rows, kl_weight)``
        builds one batch's kwargs. ``epochs`` is the default when the model has none; ``overrides`` replace fields
        of the resulting :class:`FinetuneConfig`.

        Validation cells are those of :func:`~atlasformer.finetune.common.split_cells`, as for every task (a
        seeded ``val_fraction`` of the cells, or ``val_batch`` of ``batch_key``); with 10 cells or fewer none are
        held out and the ELBO is validated on the training cells.
        """
        n_cells = len(obs)
        cfg = self.config or vae_training_config(n_cells, epochs=self.epochs or epochs, seed=self.seed, lr=lr,
                                                 batch_size=batch_size, patience=patience)
        cfg = dataclasses.replace(cfg, **(overrides or {}))
        if n_cells <= 10:
            cfg = dataclasses.replace(cfg, val_fraction=0.0)
        train, val = split_cells(obs, cfg, self.batch_key)
        self.validation_rows = val
        steps_per_epoch = max(1, BatchOrder(len(train), min(cfg.batch_size, len(train)), seed=cfg.seed,
                                            drop_last=len(train) >= cfg.batch_size).batches_per_epoch())
        step = {"n": 0}
        self.history = []

        def make_batch(rows):
            kl_weight = kl_weight_at(step["n"], steps_per_epoch)
            step["n"] += 1
            return make_inputs(train[rows], kl_weight)

        def validate(module):
            elbo, objective = self._mean_validation_losses(module, val if len(val) else train, make_inputs)
            self.history.append(elbo)
            return -objective, {"elbo_validation": elbo, "n_train": int(len(train)), "n_val": int(len(val)),
                                "epochs": cfg.epochs, "steps": step["n"]}

        self.module, self.validation = fit(self.module, len(train), make_batch, validate, cfg,
                                           description=description, log=lambda message: None)
        return self.validation

    @staticmethod
    @torch.no_grad()
    def _mean_validation_losses(module, rows: np.ndarray, make_inputs, batch_size: int = 1024) -> tuple[float, float]:
        """Mean negative ELBO (KL weight 1) per cell over ``rows`` in eval mode, and the mean loss that picks the best
        epoch: the module's ``validation_loss`` (scANVI adds its classification loss) or else the same ELBO."""
        elbo = objective = 0.0
        for start in range(0, len(rows), batch_size):
            inputs = on_device(make_inputs(rows[start : start + batch_size], 1.0), module)
            extras = module(**inputs).extras
            elbo += float(extras["elbo"].sum())
            objective += float(extras.get("validation_loss", extras["elbo"]).sum())
        return elbo / max(len(rows), 1), objective / max(len(rows), 1)

    # ------------------------------------------------------------------ inference
    def _inference_codes(self, adata: ad.AnnData, source: str) -> np.ndarray:
        return batch_codes(adata.obs, self.batch_key, self.batches, source)

    def _apply(self, adata: ad.AnnData, fn, source: str, chunk: int = 1024) -> np.ndarray:
        """``fn(inputs)`` over chunks of ``adata`` in eval mode, concatenated as float32."""
        self._require_module()
        counts = counts_for_genes(adata, self.genes, layer=self.layer, source=source)
        make_inputs = self._inputs(counts, self._inference_codes(adata, source))
        self.module.eval()
        with torch.no_grad():
            parts = [fn(on_device(make_inputs(np.arange(s, min(s + chunk, adata.n_obs)), 1.0), self.module))
                     for s in range(0, adata.n_obs, chunk)]
        return np.concatenate(parts).astype(np.float32)

    # ------------------------------------------------------------------ surgery
    def _map_query(self, query: ad.AnnData, epochs: int | None, source: str,
                   query_inputs: Callable[[sp.csr_matrix, np.ndarray], Callable]):
        """A copy of this model with the query's new batches added and only their one-hot columns trained on
        ``query`` (``query_inputs(counts, codes)`` builds its ``make_inputs``); see :meth:`SCVIModel.map_query`."""
        self._require_module()
        if self.batch_key is None:
            raise InputError("surgery adds the query's batches as new batch categories, so the reference must be "
                             "trained with a batch covariate: fit it with batch_key=... .")
        counts = query_counts(query, self.genes, layer=self.layer, source=source)
        check_cells_have_counts(counts, source, "the query mapping")
        check_obs_key(query.obs, self.batch_key, source=source, what="batch_key")
        new = sorted(set(query.obs[self.batch_key].astype(str)) - set(self.batches))
        mapped = copy.deepcopy(self)
        if not new:
            warnings.warn(f"{source}: every batch in obs[{self.batch_key!r}] is already one of the reference's; "
                          "nothing to map: returning an unchanged copy (embed or predict the query directly).",
                          stacklevel=3)
            return mapped
        if not self.module.config.encode_covariates:
            warnings.warn("the reference encoder does not see the batch (encode_covariates=False), so surgery changes "
                          "only the decoder and leaves the query's embedding and labels as they were; train the "
                          "reference with encode_covariates=True (scArches' setting) for a mapped embedding.",
                          stacklevel=3)
        mapped.batches, mapped.epochs = self.batches + new, epochs
        mapped.module = NewBatchColumnsOnly(with_new_batches(self.module, len(mapped.batches)), len(self.batches))
        warmup = getattr(self, "n_epochs_kl_warmup", 400)
        # no weight decay: it would move the frozen columns of the weights that hold new columns
        overrides = {"weight_decay": 0.0, "mode": "full", **({"epochs": epochs} if epochs else {})}
        mapped._train(query.obs, query_inputs(counts, batch_codes(query.obs, self.batch_key, mapped.batches, source)),
                      lambda step, per_epoch: min(1.0, (step // per_epoch) / warmup) if warmup else 1.0,
                      lr=1e-3, batch_size=128, patience=None, description="query surgery", overrides=overrides)
        mapped.module = mapped.module.release()
        mapped.validation = {**mapped.validation, "query_batches": len(new)}
        return mapped

    # ------------------------------------------------------------------ persistence
    def _keys(self) -> dict:
        return {"batch_key": self.batch_key, "layer": self.layer, "genes": self.genes, "batches": self.batches,
                "validation": {k: v for k, v in self.validation.items() if isinstance(v, (int, float))}}

    def save(self, folder: str | Path, run_config: dict | None = None, *, overwrite: bool = False) -> Path:
        """Write the model folder with :func:`atlasformer.checkpoints.save_vae_folder`: ``config.json`` (architecture,
        module config and AnnData keys), ``model.safetensors``, a card and the manifest, atomically (an existing
        folder with files atlasformer did not write is refused unless ``overwrite``)."""
        self._require_module()
        keys = {"wrapper": type(self).__name__, **self._keys()}
        return save_vae_folder(self.module, folder, keys, run_config, keys["validation"], overwrite=overwrite)

    @classmethod
    def load(cls, folder: str | Path, **overrides):
        """Load a folder or hub id written by :meth:`save` through the model-folder reader
        (:func:`atlasformer.checkpoints.load_vae_folder`: safetensors only, checksums verified)."""
        module, config = load_vae_folder(resolve_model(folder), architectures=tuple(cls.module_classes))
        model = cls(batch_key=config["batch_key"], layer=config["layer"], **overrides)
        model.module, model.genes, model.batches = module, config["genes"], config["batches"]
        model.validation = config.get("validation", {})
        model._restore(config)
        return model

    def _restore(self, config: dict) -> None:
        """Subclasses restore extra keys saved by :meth:`_keys`."""


class SCVIModel(_VAEModel):
    """scVI on AnnData: a latent space with the batch regressed out, and denoised expression.

    Parameters
    ----------
    batch_key
        obs column with batches (the decoder is conditioned on it); None for one batch.
    layer
        Raw counts from this layer instead of X.
    genes
        Genes to model (e.g. HVGs); default all of var_names.
    epochs
        Training epochs (default scvi-tools' heuristic, at most 400).
    seed
        Seed of initialisation, validation split, batch order and sampling.
    config
        A full :class:`FinetuneConfig` instead of scvi-tools' training plan.
    **module_kwargs
        :class:`~atlasformer.model_zoo.vae.SCVIConfig` fields (``n_latent=10``, ``gene_likelihood="zinb"``, ...).

    Examples
    --------
    >>> model = SCVIModel(batch_key="batch", gene_likelihood="nb")
    >>> model.fit(adata)
    >>> adata.obsm["X_scvi"] = model.embed(adata)
    """

    module_classes = {"SCVIModule": (SCVIConfig, SCVIModule)}
    default_key = "scvi"

    def __init__(self, *, genes: list[str] | None = None, n_epochs_kl_warmup: int = 400, **kwargs):
        super().__init__(**kwargs)
        self.genes = list(genes) if genes is not None else None
        self.n_epochs_kl_warmup = n_epochs_kl_warmup

    def _inputs(self, counts: sp.csr_matrix, codes: np.ndarray):
        def make_inputs(rows, kl_weight):
            return {"x": torch.from_numpy(counts[rows].toarray()),
                    "batch_index": torch.from_numpy(codes[rows, None]),
                    "kl_weight": torch.tensor(float(kl_weight))}
        return make_inputs

    def fit(self, adata: ad.AnnData, source: str = "data") -> dict:
        """Train on every cell of ``adata`` (10% held out for the validation ELBO); returns validation metrics."""
        self.genes = self.genes or list(map(str, adata.var_names))
        counts = counts_for_genes(adata, self.genes, layer=self.layer, source=source)
        codes = self._setup_batches(adata, source)
        check_cells_have_counts(counts, source, "scVI")
        torch.manual_seed(self.seed)
        self.module = SCVIModule(SCVIConfig(n_genes=len(self.genes), n_batch=len(self.batches), **self.module_kwargs))
        warmup = self.n_epochs_kl_warmup
        return self._train(adata.obs, self._inputs(counts, codes),
                           lambda step, per_epoch: min(1.0, (step // per_epoch) / warmup) if warmup else 1.0,
                           lr=1e-3, batch_size=128, patience=None, description="scvi")

    def map_query(self, query: ad.AnnData, *, epochs: int | None = None, source: str = "query") -> SCVIModel:
        """Map ``query`` onto this reference by scArches surgery; returns a new model, this one is unchanged.

        The new model's batches are this model's followed by the query's new ones (``obs[batch_key]``). Every
        reference weight is copied and frozen (batch-norm statistics included); the new batches' one-hot columns,
        zero-initialised, are the only weights trained on the query (Adam without weight decay, scvi-tools'
        training plan otherwise). For the query's embedding to move, the reference must have been trained with
        ``encode_covariates=True`` (scArches' setting; the encoder then sees the batch).

        Parameters
        ----------
        query
            Raw counts with every gene of the reference (extra genes are ignored) and ``obs[batch_key]``.
        epochs
            Query training epochs (default scvi-tools' heuristic on the query's cells, or the epochs of the full
            ``config`` the reference was given; its other settings apply too).
        source
            Name of the query in messages.

        Returns
        -------
        SCVIModel
            The mapped model; its ``embed`` / ``predict`` take reference and query cells alike.
        """
        return self._map_query(query, epochs, source, self._inputs)

    def embed(self, adata: ad.AnnData, source: str = "data") -> np.ndarray:
        """(cells, n_latent) posterior means of z."""
        return self._apply(adata, lambda inp: self.module.encode(inp["x"], inp["batch_index"]).loc.cpu().numpy(), source)

    def predict(self, adata: ad.AnnData, source: str = "data", transform_batch: str | None = None) -> np.ndarray:
        """(cells, genes) expected expression proportions (rows sum to 1), optionally as if in ``transform_batch``."""
        batch = None if transform_batch is None else self.batches.index(str(transform_batch))
        return self._apply(adata, lambda inp: self.module.normalized_expression(
            inp["x"], inp["batch_index"], transform_batch=batch).cpu().numpy(), source)

    def reconstruction_loss(self, adata: ad.AnnData, source: str = "data") -> float:
        """Mean per-cell -log p(x | z), z sampled from q(z | x) (scvi-tools' ``get_reconstruction_error``)."""
        torch.manual_seed(self.seed)
        per_cell = self._apply(adata, lambda inp: self.module(**inp).extras["reconstruction"].cpu().numpy(), source)
        return float(per_cell.mean())

    def write_outputs(self, adata: ad.AnnData, target: ad.AnnData, *, key_added: str = "scvi", source: str = "data") -> None:
        """``obsm['X_<key_added>']`` latent and ``layers['<key_added>_denoised']`` (CP10k, the model's genes)."""
        target.obsm[f"X_{key_added}"] = self.embed(adata, source)
        if list(map(str, target.var_names)) == self.genes:
            target.layers[f"{key_added}_denoised"] = self.predict(adata, source) * 1e4

    def plots(self, output: Path) -> list[Path]:
        return []

    def _keys(self) -> dict:
        return {**super()._keys(), "n_epochs_kl_warmup": self.n_epochs_kl_warmup}

    def _restore(self, config: dict) -> None:
        self.n_epochs_kl_warmup = config.get("n_epochs_kl_warmup", 400)


def protein_background_prior(protein: np.ndarray, codes: np.ndarray, n_batch: int, observed: np.ndarray,
                             seed: int = 0, n_cells: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """scvi-tools' empirical prior of the log protein background, (proteins, batches) mean and scale.

    Per batch, a two-component Gaussian mixture on each of ``n_cells`` random cells' log1p protein counts;
    the lower component's mean and standard deviation, averaged over cells.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(seed)
    means, scales = [], []
    for b in range(n_batch):
        cells = protein[(codes == b) & observed]
        if len(cells) == 0:
            means.append(0.0)
            scales.append(0.05)
            continue
        mus, sds = [], []
        for c in cells[rng.choice(len(cells), size=n_cells)]:
            with warnings.catch_warnings():
                warnings.simplefilter("error", ConvergenceWarning)
                try:
                    gmm = GaussianMixture(n_components=2, random_state=seed).fit(np.log1p(c.reshape(-1, 1)))
                except (ConvergenceWarning, ValueError):
                    mus.append(0.0)
                    sds.append(0.05)
                    continue
            low = np.argsort(gmm.means_.ravel())[0]
            mus.append(float(gmm.means_.ravel()[low]))
            sds.append(float(np.sqrt(gmm.covariances_.ravel()[low])))
        means.append(float(np.mean(mus)))
        scales.append(float(np.sqrt(np.sum(np.square(sds)) / n_cells**2)))
    n_proteins = protein.shape[1]
    return np.tile(np.asarray(means)[None], (n_proteins, 1)), np.tile(np.asarray(scales)[None], (n_proteins, 1))


class TOTALVIModel(_VAEModel):
    """totalVI on paired RNA + protein AnnData: a joint latent, denoised RNA and protein, RNA -> protein.

    ``fit(adata, protein, protein_observed=mask)`` trains on every cell; cells whose mask is False have no
    protein measurement (their counts are ignored), and :meth:`predict` imputes their proteins: this is
    how totalVI predicts protein from RNA (transductively, as in scvi-tools with a protein batch mask).

    Parameters
    ----------
    batch_key, layer, genes, epochs, seed, config
        As :class:`SCVIModel`; ``protein_layer`` reads protein counts from a layer of the protein AnnData.
    **module_kwargs
        :class:`~atlasformer.model_zoo.vae.TOTALVIConfig` fields (``n_latent=20``, ...).
    """

    module_classes = {"TOTALVIModule": (TOTALVIConfig, TOTALVIModule)}
    default_key = "totalvi"

    def __init__(self, *, genes: list[str] | None = None, protein_layer: str | None = None,
                 empirical_background_prior: bool | None = None, **kwargs):
        super().__init__(**kwargs)
        self.genes = list(genes) if genes is not None else None
        self.protein_layer = protein_layer
        self.empirical_background_prior = empirical_background_prior
        self.proteins: list[str] = []

    def _protein_counts(self, adata: ad.AnnData, protein: ad.AnnData | None, source: str) -> np.ndarray:
        if protein is None:
            return np.zeros((adata.n_obs, len(self.proteins)), dtype=np.float32)
        if protein.n_obs != adata.n_obs or not np.array_equal(protein.obs_names, adata.obs_names):
            raise InputError(f"{source}: the protein AnnData must have the RNA file's obs_names in the same order.")
        return counts_for_genes(protein, self.proteins or None, layer=self.protein_layer,
                                source=f"{source} (protein)").toarray()

    def _inputs(self, counts, protein, codes, observed):
        def make_inputs(rows, kl_weight):
            return {"x": torch.from_numpy(counts[rows].toarray()), "y": torch.from_numpy(protein[rows]),
                    "batch_index": torch.from_numpy(codes[rows, None]),
                    "protein_observed": torch.from_numpy(observed[rows]), "kl_weight": torch.tensor(float(kl_weight))}
        return make_inputs

    def fit(self, adata: ad.AnnData, protein: ad.AnnData | None = None, source: str = "data",
            protein_observed: np.ndarray | None = None) -> dict:
        """Train on RNA ``adata`` and paired ``protein`` counts (required; optional in the signature only, as the
        task contract's ``fit(adata)``); returns validation metrics."""
        if protein is None:
            raise InputError("totalVI trains on RNA and protein: fit(adata, protein), protein an AnnData of the same cells.")
        self.genes = self.genes or list(map(str, adata.var_names))
        self.proteins = list(map(str, protein.var_names))
        counts = counts_for_genes(adata, self.genes, layer=self.layer, source=source)
        y = self._protein_counts(adata, protein, source)
        codes = self._setup_batches(adata, source)
        observed = np.ones(adata.n_obs, bool) if protein_observed is None else np.asarray(protein_observed, bool)
        y = np.where(observed[:, None], y, 0).astype(np.float32)
        torch.manual_seed(self.seed)
        prior = {}
        if self.empirical_background_prior if self.empirical_background_prior is not None else len(self.proteins) > 10:
            mean, scale = protein_background_prior(y, codes, len(self.batches), observed, seed=self.seed)
            prior = {"background_prior_mean": mean.tolist(), "background_prior_scale": scale.tolist()}
        self.module = TOTALVIModule(TOTALVIConfig(n_genes=len(self.genes), n_proteins=len(self.proteins),
                                                  n_batch=len(self.batches), **prior, **self.module_kwargs))
        warmup_steps = int(0.75 * adata.n_obs)
        return self._train(adata.obs, self._inputs(counts, y, codes, observed),
                           lambda step, per_epoch: min(1.0, step / warmup_steps) if warmup_steps else 1.0,
                           lr=4e-3, batch_size=256, patience=45, description="totalvi")

    def _predict_all(self, adata, protein, source, transform_batch=None, chunk: int = 512) -> dict[str, np.ndarray]:
        self._require_module()
        counts = counts_for_genes(adata, self.genes, layer=self.layer, source=source)
        y = self._protein_counts(adata, protein, source).astype(np.float32)
        codes = batch_codes(adata.obs, self.batch_key, self.batches, source)
        batch = None if transform_batch is None else self.batches.index(str(transform_batch))
        make_inputs = self._inputs(counts, y, codes, np.ones(adata.n_obs, bool))
        self.module.eval()
        parts = {"latent": [], "gene_scale": [], "protein": []}
        with torch.no_grad():
            for start in range(0, adata.n_obs, chunk):
                inp = on_device(make_inputs(np.arange(start, min(start + chunk, adata.n_obs)), 1.0), self.module)
                parts["latent"].append(self.module.encode(inp["x"], inp["y"], inp["batch_index"]).loc.cpu().numpy())
                out = self.module.predict(inp["x"], inp["y"], inp["batch_index"], transform_batch=batch)
                parts["gene_scale"].append(out["gene_scale"].cpu().numpy())
                parts["protein"].append(out["protein"].cpu().numpy())
        return {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}

    def embed(self, adata: ad.AnnData, protein: ad.AnnData | None = None, source: str = "data") -> np.ndarray:
        """(cells, n_latent) posterior means; cells without ``protein`` are encoded with zero protein counts."""
        return self._predict_all(adata, protein, source)["latent"]

    def predict(self, adata: ad.AnnData, protein: ad.AnnData | None = None, source: str = "data",
                transform_batch: str | None = None) -> pd.DataFrame:
        """(cells, proteins) expected protein counts (background included), as if measured in ``transform_batch``."""
        out = self._predict_all(adata, protein, source, transform_batch)
        return pd.DataFrame(out["protein"], index=adata.obs_names, columns=self.proteins)

    def write_outputs(self, adata: ad.AnnData, target: ad.AnnData, *, protein: ad.AnnData | None = None,
                      key_added: str = "totalvi", source: str = "data") -> None:
        """``obsm['X_<key_added>']``, ``obsm['protein_predicted']`` (CLR) and ``uns['protein_predicted_names']``."""
        out = self._predict_all(adata, protein, source)
        target.obsm[f"X_{key_added}"] = out["latent"]
        target.obsm["protein_predicted"] = clr(out["protein"])
        target.uns["protein_predicted_names"] = np.asarray(self.proteins, dtype=object)

    def plots(self, output: Path) -> list[Path]:
        return []

    def _keys(self) -> dict:
        return {**super()._keys(), "proteins": self.proteins, "protein_layer": self.protein_layer}

    def _restore(self, config: dict) -> None:
        self.proteins, self.protein_layer = config.get("proteins", []), config.get("protein_layer")


class SCANVIModel(_VAEModel):
    """scANVI on AnnData: scVI with a label-aware latent, trained on partly labelled cells; predicts their labels.

    Cells whose ``obs[labels_key]`` is NaN or ``unlabeled_category`` are unlabelled: they shape the latent
    space through the ELBO with their label marginalised, and receive predictions.

    Parameters
    ----------
    labels_key
        obs column with cell-type labels (may also be given to :meth:`fit`).
    unlabeled_category
        The value marking unlabelled cells (scvi-tools' convention ``"Unknown"``); NaN is unlabelled too.
    batch_key, layer, genes, epochs, seed, config
        As :class:`SCVIModel` (default epochs: scvi-tools' heuristic; from a scVI model,
        ``min(10, max(2, heuristic / 3))`` as scvi-tools).
    n_epochs_kl_warmup
        Epochs over which the KL weight rises from 0 to 1 (scvi-tools: 400).
    **module_kwargs
        :class:`~atlasformer.model_zoo.vae.SCANVIConfig` fields (``n_latent=10``, ``classification_ratio=50``,
        ``encode_covariates=True`` for query surgery, ...).

    Examples
    --------
    >>> scvi_model = SCVIModel(batch_key="batch")
    >>> scvi_model.fit(adata)
    >>> model = SCANVIModel.from_scvi_model(scvi_model, labels_key="cell_type")
    >>> model.fit(adata)  # cells labelled "Unknown" are predicted
    >>> adata.obs["scanvi_label"] = model.predict(adata)
    """

    module_classes = {"SCANVIModule": (SCANVIConfig, SCANVIModule)}
    default_key = "scanvi"

    def __init__(self, *, labels_key: str | None = None, unlabeled_category: str = "Unknown",
                 genes: list[str] | None = None, n_epochs_kl_warmup: int = 400, **kwargs):
        super().__init__(**kwargs)
        self.labels_key, self.unlabeled_category = labels_key, unlabeled_category
        self.genes = list(genes) if genes is not None else None
        self.n_epochs_kl_warmup = n_epochs_kl_warmup
        self.classes_: np.ndarray = np.array([], dtype=object)
        self.scvi_state: dict | None = None  # weights of the scVI model this one starts from

    @classmethod
    def from_scvi_model(cls, scvi_model: SCVIModel, *, labels_key: str | None = None,
                        unlabeled_category: str = "Unknown", **kwargs) -> SCANVIModel:
        """An unfitted scANVI model that :meth:`fit` starts from ``scvi_model``'s weights (scvi-tools' recipe).

        Genes, batches, count layer, seed, KL warm-up and architecture are the scVI model's; ``kwargs`` are
        further :class:`SCANVIModel` options (``epochs``, ``classification_ratio``, ...).
        """
        scvi_model._require_module()
        if type(scvi_model.module) is not SCVIModule:
            raise InputError(f"from_scvi_model takes a fitted SCVIModel, not a {type(scvi_model).__name__}.")
        architecture = {k: v for k, v in scvi_model.module.config.to_dict().items()
                        if k not in ("n_genes", "n_batch", "architecture")}
        options = {"batch_key": scvi_model.batch_key, "layer": scvi_model.layer, "seed": scvi_model.seed,
                   "n_epochs_kl_warmup": scvi_model.n_epochs_kl_warmup, **architecture, **kwargs}
        model = cls(labels_key=labels_key, unlabeled_category=unlabeled_category, genes=scvi_model.genes, **options)
        model.batches = list(scvi_model.batches)
        model.scvi_state = {k: v.detach().cpu().clone() for k, v in scvi_model.module.state_dict().items()}
        return model

    # ------------------------------------------------------------------ setup
    def _labels(self, obs: pd.DataFrame, labels_key: str | None, source: str) -> np.ndarray:
        """Label codes (cells,) in the order of ``classes_`` (set here), -1 for unlabelled cells."""
        if labels_key is None:
            raise InputError("scANVI trains on cell-type labels: pass labels_key (the obs column holding them, with "
                             f"unlabelled cells marked {self.unlabeled_category!r} or NaN), e.g. "
                             "fit(adata, labels_key='cell_type').")
        check_obs_key(obs, labels_key, source=source, what="labels_key")
        values = obs[labels_key]
        unlabelled = values.isna().to_numpy() | (values.astype(str) == str(self.unlabeled_category)).to_numpy()
        names = values.astype(str).to_numpy()
        classes = sorted(set(names[~unlabelled]))
        if not classes:
            raise InputError(f"{source}: no labelled cells: every value of obs[{labels_key!r}] is NaN or the "
                             f"unlabeled_category {self.unlabeled_category!r}. Label some cells, or pass the value "
                             "that marks unlabelled cells as unlabeled_category.")
        if len(classes) < 2:
            raise InputError(f"{source}: the labelled cells of obs[{labels_key!r}] hold one class ({classes[0]!r}); "
                             "scANVI needs at least two to classify. Label cells of other types too.")
        self.classes_ = np.asarray(classes, dtype=object)
        codes = pd.Index(classes).get_indexer(names)
        return np.where(unlabelled, -1, codes).astype(np.int64)

    def _inputs(self, counts: sp.csr_matrix, codes: np.ndarray, labels: np.ndarray | None = None):
        labels = np.full(len(codes), -1, dtype=np.int64) if labels is None else labels

        def make_inputs(rows, kl_weight):
            return {"x": torch.from_numpy(counts[rows].toarray()),
                    "batch_index": torch.from_numpy(codes[rows, None]),
                    "labels": torch.from_numpy(labels[rows]),
                    "kl_weight": torch.tensor(float(kl_weight))}
        return make_inputs

    # ------------------------------------------------------------------ training
    def fit(self, adata: ad.AnnData, *, labels_key: str | None = None, unlabeled_category: str | None = None,
            source: str = "data") -> dict:
        """Train on every cell of ``adata``, labelled or not (10% held out for the validation ELBO).

        Parameters
        ----------
        adata
            Raw counts; ``obs[labels_key]`` with unlabelled cells marked ``unlabeled_category`` or NaN.
        labels_key, unlabeled_category
            Override the values given at construction.
        source
            Name of the data in messages.

        Returns
        -------
        dict
            Validation metrics: ``elbo_validation`` and, over labelled validation cells, ``accuracy_validation``.
        """
        self.labels_key = labels_key or self.labels_key
        self.unlabeled_category = self.unlabeled_category if unlabeled_category is None else unlabeled_category
        labels = self._labels(adata.obs, self.labels_key, source)
        self.genes = self.genes or list(map(str, adata.var_names))
        counts = counts_for_genes(adata, self.genes, layer=self.layer, source=source)
        pretrained = self.scvi_state is not None  # batches are the scVI model's: its weights are tied to them
        codes = batch_codes(adata.obs, self.batch_key, self.batches, source) if pretrained \
            else self._setup_batches(adata, source)
        check_cells_have_counts(counts, source, "scANVI")
        torch.manual_seed(self.seed)
        self.module = SCANVIModule(SCANVIConfig(n_genes=len(self.genes), n_batch=len(self.batches),
                                                n_labels=len(self.classes_), **self.module_kwargs))
        epochs = None
        if pretrained:
            self._load_scvi_weights()
            epochs = min(10, max(2, round(max_epochs_heuristic(adata.n_obs) / 3)))
        warmup = self.n_epochs_kl_warmup
        metrics = self._train(adata.obs, self._inputs(counts, codes, labels),
                              lambda step, per_epoch: min(1.0, (step // per_epoch) / warmup) if warmup else 1.0,
                              lr=1e-3, batch_size=128, patience=None, description="scanvi", epochs=epochs)
        self.validation = {**metrics, **self._validation_accuracy(adata, labels, source)}
        return self.validation

    def _load_scvi_weights(self) -> None:
        missing, unexpected = self.module.load_state_dict(self.scvi_state, strict=False)
        own = ("classifier.", "z2_encoder.", "z1_decoder.")
        if unexpected or any(not key.startswith(own) for key in missing):
            raise InputError("the scVI model's weights do not fit this scANVI model (architecture or genes differ); "
                             "build it with SCANVIModel.from_scvi_model(scvi_model) and pass no architecture options.")

    def _validation_accuracy(self, adata: ad.AnnData, labels: np.ndarray, source: str) -> dict:
        rows = self.validation_rows[labels[self.validation_rows] >= 0]
        if not len(rows):
            return {}
        predicted = self.predict_proba(adata[rows], source=source).argmax(1)
        return {"accuracy_validation": float((predicted == labels[rows]).mean()), "n_val_labelled": int(len(rows))}

    def map_query(self, query: ad.AnnData, *, epochs: int | None = None, source: str = "query") -> SCANVIModel:
        """Map an unlabelled ``query`` onto this reference by scArches surgery; returns a new model.

        As :meth:`SCVIModel.map_query`: only the query's new batch columns are trained (on the unlabelled
        objective, the label marginalised); the classifier and every other weight stay the reference's.
        """
        return self._map_query(query, epochs, source, self._inputs)

    # ------------------------------------------------------------------ inference
    def _inference_codes(self, adata: ad.AnnData, source: str) -> np.ndarray:
        if not self.module.config.encode_covariates:  # embedding and labels come from an encoder blind to batch
            return np.zeros(adata.n_obs, dtype=np.int64)
        return super()._inference_codes(adata, source)

    def embed(self, adata: ad.AnnData, *, source: str = "data") -> np.ndarray:
        """(cells, n_latent) posterior means of z1 (any batch, unless the encoder sees the batch)."""
        return self._apply(adata, lambda inp: self.module.encode(inp["x"], inp["batch_index"]).loc.cpu().numpy(), source)

    def predict_proba(self, adata: ad.AnnData, *, source: str = "data") -> np.ndarray:
        """(cells, classes) label probabilities at the posterior mean of z1; columns in the order of ``classes_``."""
        return self._apply(adata, lambda inp: torch.softmax(
            self.module.classify(inp["x"], inp["batch_index"]), -1).cpu().numpy(), source)

    def predict(self, adata: ad.AnnData, *, source: str = "data") -> np.ndarray:
        """(cells,) predicted labels (str), the most probable class of :meth:`predict_proba`."""
        return self.classes_[self.predict_proba(adata, source=source).argmax(1)].astype(str)

    def write_outputs(self, adata: ad.AnnData, target: ad.AnnData, *, key_added: str = "scanvi",
                      source: str = "data") -> None:
        """``obsm['X_<key_added>']`` latent, ``obs['<key_added>_label']`` and ``obs['<key_added>_confidence']``."""
        probabilities = self.predict_proba(adata, source=source)
        target.obsm[f"X_{key_added}"] = self.embed(adata, source=source)
        target.obs[f"{key_added}_label"] = pd.Categorical(self.classes_[probabilities.argmax(1)].astype(str),
                                                          categories=self.classes_.astype(str))
        target.obs[f"{key_added}_confidence"] = probabilities.max(1)

    def plots(self, output: Path) -> list[Path]:
        return []

    # ------------------------------------------------------------------ persistence
    def _keys(self) -> dict:
        return {**super()._keys(), "labels_key": self.labels_key, "unlabeled_category": self.unlabeled_category,
                "classes": [str(c) for c in self.classes_], "n_epochs_kl_warmup": self.n_epochs_kl_warmup}

    def _restore(self, config: dict) -> None:
        self.labels_key, self.unlabeled_category = config.get("labels_key"), config.get("unlabeled_category", "Unknown")
        self.classes_ = np.asarray(config["classes"], dtype=object)
        self.n_epochs_kl_warmup = config.get("n_epochs_kl_warmup", 400)
