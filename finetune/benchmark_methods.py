"""Every benchmark method as one small function of a split, in a dict per task (plain lookups).

A function gets a :class:`Split` (training and test cells of one fold, HVGs / PCs fitted on the training
cells on demand) or, for imputation, a :class:`Thinned` (the x_train of molecular cross-validation), and
returns predicted labels, an embedding, expression proportions or predicted modality values. Results that
do not depend on the fold (a transductive scVI latent, the pretrained embedding) are cached per seed.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass, field
from functools import cached_property

import anndata as ad
import numpy as np
import scipy.sparse as sp

from atlasformer.checkpoints import CheckpointError
from atlasformer.tokenization import InputError, TokenizerConfig

from . import baselines as b
from .config import FinetuneConfig
from .vae_models import SCVIModel, TOTALVIModel

SCVI_TOOLS_MISSING = "scvi-tools is not installed; install the reference extra: pip install 'atlasformer[reference]'."


# ------------------------------------------------------------------ what a method sees
@dataclass
class Split:
    """Training and test cells (positions in ``inp.adata``) of one fold; features fitted on the training cells."""

    inp: object
    train: np.ndarray
    test: np.ndarray
    seed: int
    cfg: object
    fold: str | None = None
    targets: np.ndarray | None = None

    @cached_property
    def features(self) -> b.RNAFeatures:
        return b.RNAFeatures.fit(self.inp.counts[self.train], n_hvgs=self.cfg.n_hvgs, n_pcs=self.cfg.n_pcs, seed=self.seed)

    def pcs(self, rows) -> np.ndarray:
        return self.features.pcs(self.inp.counts[rows])

    def hvgs(self, rows) -> np.ndarray:
        return self.features.hvg_matrix(self.inp.counts[rows])

    def adata(self, rows) -> ad.AnnData:
        return self.inp.adata[rows].copy()


@dataclass
class Thinned:
    """Molecular cross-validation input: the subsampled cells and their thinned training counts."""

    inp: object
    cells: np.ndarray
    x_train: sp.csr_matrix
    seed: int
    cfg: object
    cache: dict = field(default_factory=dict)

    @cached_property
    def adata(self) -> ad.AnnData:
        """x_train as an AnnData (counts in X) with the cells' obs and the file's var."""
        obs = self.inp.adata.obs.iloc[self.cells].copy()
        return ad.AnnData(self.x_train.copy(), obs=obs, var=self.inp.adata.var.copy())


ABLATIONS = {"atlasformer_no_expression": {"expression_genes": 0}, "atlasformer_expression_only": {"use_embedding": False}}
"""atlasformer with one part of the recipe taken away, so the report shows what each adds: the expression path,
and the pretrained embedding beside it."""


def finetune_config(inp, seed: int, cfg, *, scratch: bool = False, ablation: str | None = None) -> FinetuneConfig:
    """The same fine-tuning budget for atlasformer and atlasformer_scratch; scratch copies the pretrained architecture."""
    ft = dataclasses.replace(cfg.finetune, seed=seed, **ABLATIONS.get(ablation, {}))
    if not scratch:
        return ft
    arch, pretrained_tokenizer = pretrained_architecture(inp)
    tok = pretrained_tokenizer or ft.tokenizer
    if not resolvable_genes(inp):  # e.g. var_names '0', '1', ...: a from-scratch vocabulary can use them as they are
        tok = dataclasses.replace(tok, gene_id_mode="raw")
    # genes per cell is the fine-tuning config's one setting: the pretrained model's, unless set
    genes = ft.max_seq_len or (pretrained_tokenizer.max_seq_len if pretrained_tokenizer else None)
    tok = dataclasses.replace(tok, max_seq_len=TokenizerConfig.max_seq_len)
    return dataclasses.replace(ft, from_scratch=True, lr=cfg.scratch_lr or ft.lr,
                               scratch_model=arch or ft.scratch_model, tokenizer=tok, max_seq_len=genes)


def resolvable_genes(inp) -> bool:
    """Whether the file's genes resolve to gene identifiers (symbols / Ensembl IDs) for a vocabulary."""
    if "resolvable" not in inp.cache:
        from atlasformer.tokenization import build_vocab

        try:
            build_vocab([inp.adata], gene_key=inp.gene_key)
            inp.cache["resolvable"] = True
        except InputError:
            inp.cache["resolvable"] = False
    return inp.cache["resolvable"]


def pretrained_architecture(inp):
    """(CellTransformerConfig fields, TokenizerConfig) of ``--model``, or (None, None) without one."""
    if not inp.model:
        return None, None
    if "architecture" not in inp.cache:
        model, tokenizer = pretrained(inp)
        keep = ("d_model", "n_layers", "n_heads", "d_ff", "dropout", "attention_dropout", "norm_first", "activation",
                "gene_embedding_norm", "embedding_norm", "pooling")
        inp.cache["architecture"] = ({k: getattr(model.config, k) for k in keep}, tokenizer.config)
    return inp.cache["architecture"]


def pretrained(inp):
    if "pretrained" not in inp.cache:
        from atlasformer.checkpoints import load_model_folder, resolve_model

        # hub ids resolved; scGPT / Geneformer checkpoints converted on the fly (cached)
        inp.cache["pretrained"] = load_model_folder(resolve_model(inp.model))
    return inp.cache["pretrained"]


def zero_shot_embedding(inp, adata: ad.AnnData | None = None) -> np.ndarray:
    """(cells, d_model) pretrained cell embeddings, not fine-tuned (zeros for cells without vocabulary genes)."""
    from .common import iter_model_outputs, to_inference_device

    model, tokenizer = pretrained(inp)
    to_inference_device(model).eval()  # the GPU when there is one
    adata = inp.adata if adata is None else adata
    out = np.zeros((adata.n_obs, model.config.d_model), dtype=np.float32)
    for rows, emb in iter_model_outputs(model, adata, tokenizer, layer=inp.layer, gene_key=inp.gene_key, source=inp.source):
        out[rows] = emb
    return out


def cached_zero_shot(inp) -> np.ndarray:
    if "zero_shot" not in inp.cache:
        inp.cache["zero_shot"] = zero_shot_embedding(inp)
    return inp.cache["zero_shot"]


# ------------------------------------------------------------------ which methods a file supports
def unsupported(method: str, task: str, inp) -> str | None:
    """Why ``method`` cannot run on this file / environment, or None."""
    if method in ("atlasformer", "atlasformer_zeroshot", *ABLATIONS):
        if not inp.model:
            return "needs --model (a pretrained atlasformer checkpoint)."
        try:
            from atlasformer.tokenization import column_token_ids

            _, tokenizer = pretrained(inp)
            column_token_ids(inp.adata, tokenizer, layer=inp.layer, gene_key=inp.gene_key, source=inp.source)
        except (InputError, CheckpointError) as err:
            return f"the pretrained vocabulary cannot tokenize this file: {err}"
    if method.startswith("atlasformer") and method != "atlasformer_zeroshot" and task in TASK_CLASSES:
        if TASK_CLASSES[task]() is None:
            return f"no atlasformer {task} fine-tuning class in this build."
    if method == "scvi_tools" and importlib.util.find_spec("scvi") is None:
        return SCVI_TOOLS_MISSING
    return None


def _task_class(module: str, name: str):
    def load():
        try:
            return getattr(importlib.import_module(f"atlasformer.finetune.{module}"), name)
        except (ImportError, AttributeError):
            return None
    return load


TASK_CLASSES = {"annotation": _task_class("annotation", "Annotator"),
                "integration": _task_class("integration", "Integrator"),
                "imputation": _task_class("imputation", "Imputer"),
                "modality": _task_class("modality", "ModalityPredictor")}


# ------------------------------------------------------------------ scVI and scvi-tools latents (transductive)
def all_cell_hvgs(inp, cfg) -> np.ndarray:
    """HVG columns chosen on all cells: scVI's latent is trained transductively on every cell (BENCHMARKS.md)."""
    if "hvgs_all" not in inp.cache:
        inp.cache["hvgs_all"] = b.select_hvgs(b.log_normalize(inp.counts), cfg.n_hvgs)
    return inp.cache["hvgs_all"]


def scvi_latent(split: Split, reference: bool = False) -> np.ndarray:
    """The scVI latent of every cell (batch covariate, HVGs), trained once per seed and shared by the folds."""
    inp, key = split.inp, ("scvi_tools" if reference else "scvi", split.seed)
    if key not in inp.cache:
        hvgs = all_cell_hvgs(inp, split.cfg)
        adata = inp.adata[:, hvgs].copy()
        keep = np.asarray(inp.counts[:, hvgs].sum(1)).ravel() > 0  # scVI needs counts in the modelled genes
        latent = np.zeros((adata.n_obs, 10), dtype=np.float32)
        train = scvi_tools_latent if reference else our_scvi_latent
        latent[keep] = train(adata[keep].copy(), inp, split.cfg, split.seed)
        inp.cache[key] = latent
    return inp.cache[key]


def our_scvi_latent(adata, inp, cfg, seed) -> np.ndarray:
    model = SCVIModel(batch_key=inp.batch_key if inp.n_batches > 1 else None, layer=inp.layer,
                      epochs=cfg.scvi_epochs, seed=seed)
    model.fit(adata, source=inp.source)
    return model.embed(adata, source=inp.source)


def scvi_tools_model(adata, batch_key, layer, epochs, seed):
    """scvi-tools' SCVI at its defaults (n_latent 10, ZINB), trained for ``epochs`` (None: its heuristic)."""
    import scvi

    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    scvi.model.SCVI.setup_anndata(adata, layer=layer, batch_key=batch_key)
    model = scvi.model.SCVI(adata)
    model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False, logger=False,
                enable_checkpointing=False)
    return model


def scvi_tools_latent(adata, inp, cfg, seed) -> np.ndarray:
    adata.obs = adata.obs.copy()
    model = scvi_tools_model(adata, inp.batch_key if inp.n_batches > 1 else None, inp.layer, cfg.scvi_epochs, seed)
    return np.asarray(model.get_latent_representation(), dtype=np.float32)


# ------------------------------------------------------------------ annotation: predicted labels of split.test
def _fit_annotator(split: Split, scratch: bool, ablation: str | None = None) -> np.ndarray:
    inp = split.inp
    annotator = TASK_CLASSES["annotation"]()(None if scratch else inp.model,
                                             finetune_config(inp, split.seed, split.cfg, scratch=scratch, ablation=ablation),
                                             labels_key=inp.labels_key, layer=inp.layer, gene_key=inp.gene_key)
    annotator.fit(split.adata(split.train), source=inp.source)
    return annotator.predict(split.adata(split.test), source=inp.source)["label"].to_numpy()


def _knn_on(embedding: np.ndarray, split: Split) -> np.ndarray:
    return b.knn_classify(embedding[split.train], split.inp.labels[split.train], embedding[split.test], k=split.cfg.k)


ANNOTATION = {
    "logreg": lambda s: b.logreg(s.hvgs(s.train), s.inp.labels[s.train], s.hvgs(s.test), seed=s.seed),
    "pca_knn": lambda s: b.knn_classify(s.pcs(s.train), s.inp.labels[s.train], s.pcs(s.test), k=s.cfg.k),
    "scvi": lambda s: _knn_on(scvi_latent(s), s),
    "scvi_tools": lambda s: _knn_on(scvi_latent(s, reference=True), s),
    "atlasformer": lambda s: _fit_annotator(s, scratch=False),
    "atlasformer_scratch": lambda s: _fit_annotator(s, scratch=True),
    "atlasformer_zeroshot": lambda s: _knn_on(cached_zero_shot(s.inp), s),
    **{name: (lambda s, a=name: _fit_annotator(s, scratch=False, ablation=a)) for name in ABLATIONS},
}


# ------------------------------------------------------------------ integration: an embedding of every cell
def _fit_integrator(split: Split, scratch: bool, ablation: str | None = None) -> np.ndarray:
    inp = split.inp
    integrator = TASK_CLASSES["integration"]()(None if scratch else inp.model,
                                               finetune_config(inp, split.seed, split.cfg, scratch=scratch,
                                                               ablation=ablation),
                                               batch_key=inp.batch_key, layer=inp.layer, gene_key=inp.gene_key)
    adata = split.adata(split.train)
    integrator.fit(adata, source=inp.source)
    return integrator.embed(adata, source=inp.source)


INTEGRATION = {
    "pca": lambda s: s.pcs(s.train),
    "harmony": lambda s: b.harmony(s.pcs(s.train), s.inp.batch[s.train], seed=s.seed),
    "scvi": lambda s: scvi_latent(s),
    "scvi_tools": lambda s: scvi_latent(s, reference=True),
    "atlasformer": lambda s: _fit_integrator(s, scratch=False),
    "atlasformer_scratch": lambda s: _fit_integrator(s, scratch=True),
    "atlasformer_zeroshot": lambda s: cached_zero_shot(s.inp),
    **{name: (lambda s, a=name: _fit_integrator(s, scratch=False, ablation=a)) for name in ABLATIONS},
}


# ------------------------------------------------------------------ imputation: proportions (cells, genes)
def _expressed(t: Thinned) -> np.ndarray:
    """Genes with training counts: the VAEs model these; the others get proportion 0 (as no_denoising)."""
    return np.flatnonzero(np.asarray(t.x_train.sum(0)).ravel() > 0)


def _scvi_proportions(t: Thinned, reference: bool = False) -> np.ndarray:
    genes = _expressed(t)
    adata = t.adata[:, genes].copy()
    cells = np.asarray(adata.X.sum(1)).ravel() > 0
    batch_key = t.inp.batch_key if t.inp.n_batches > 1 else None
    out = np.zeros((t.adata.n_obs, t.adata.n_vars), dtype=np.float32)
    fitted = adata[cells].copy()
    if reference:
        model = scvi_tools_model(fitted, batch_key, None, t.cfg.scvi_epochs, t.seed)
        part = np.asarray(model.get_normalized_expression(library_size=1.0, return_numpy=True), dtype=np.float32)
    else:
        model = SCVIModel(batch_key=batch_key, epochs=t.cfg.scvi_epochs, seed=t.seed)
        model.fit(fitted, source=t.inp.source)
        part = model.predict(fitted, source=t.inp.source)
    out[np.ix_(np.flatnonzero(cells), genes)] = part
    out[~cells] = b.no_denoising(t.x_train[~cells]) if (~cells).any() else out[~cells]
    return out


def _fit_imputer(t: Thinned, scratch: bool, ablation: str | None = None) -> np.ndarray:
    inp = t.inp
    imputer = TASK_CLASSES["imputation"]()(None if scratch else inp.model,
                                           finetune_config(inp, t.seed, t.cfg, scratch=scratch, ablation=ablation),
                                           layer=None, gene_key=inp.gene_key)
    imputer.fit(t.adata, source=inp.source)
    cp10k = np.asarray(imputer.predict(t.adata, source=inp.source), dtype=np.float32)
    # genes the model does not predict (NaN) get 0; cells it cannot tokenize keep their raw proportions
    unknown_cells = np.isnan(cp10k).all(1)
    proportions = np.nan_to_num(cp10k, nan=0.0) / 1e4
    if unknown_cells.any():
        proportions[unknown_cells] = b.no_denoising(t.x_train[unknown_cells])
    return proportions


IMPUTATION = {
    "no_denoising": lambda t: b.no_denoising(t.x_train),
    "knn_smoothing": lambda t: b.knn_smoothing(
        t.x_train, b.RNAFeatures.fit(t.x_train, n_hvgs=t.cfg.n_hvgs, n_pcs=t.cfg.n_pcs, seed=t.seed).pcs(t.x_train), k=t.cfg.k),
    "scvi": lambda t: _scvi_proportions(t),
    "scvi_tools": lambda t: _scvi_proportions(t, reference=True),
    "atlasformer": lambda t: _fit_imputer(t, scratch=False),
    "atlasformer_scratch": lambda t: _fit_imputer(t, scratch=True),
    **{name: (lambda t, a=name: _fit_imputer(t, scratch=False, ablation=a)) for name in ABLATIONS},
    "atlasformer_zeroshot": lambda t: b.knn_smoothing(t.x_train, zero_shot_embedding(t.inp, t.adata), k=t.cfg.k),
}


# ------------------------------------------------------------------ modality: predictions for split.test
def _totalvi(split: Split) -> np.ndarray:
    """totalVI trained on every cell with the test cells' proteins hidden; proteins imputed as if in training."""
    from .metrics import clr

    inp = split.inp
    adata = split.adata(np.arange(inp.adata.n_obs))
    observed = np.zeros(adata.n_obs, bool)
    observed[split.train] = True
    adata.obs["_protein_measured"] = np.where(observed, "train", "test")
    genes = list(map(str, inp.adata.var_names[split.features.hvgs]))
    model = TOTALVIModel(batch_key="_protein_measured", layer=inp.layer, genes=genes, epochs=split.cfg.totalvi_epochs,
                         seed=split.seed)
    model.fit(adata, inp.paired, source=inp.source, protein_observed=observed)
    return clr(model.predict(adata[split.test], None, source=inp.source, transform_batch="train").to_numpy())


def _fit_modality(split: Split, scratch: bool, ablation: str | None = None) -> np.ndarray:
    inp = split.inp
    predictor = TASK_CLASSES["modality"]()(None if scratch else inp.model,
                                           finetune_config(inp, split.seed, split.cfg, scratch=scratch, ablation=ablation),
                                           modality=inp.modality, layer=inp.layer, gene_key=inp.gene_key)
    predictor.fit(split.adata(split.train), source=inp.source, paired=inp.paired[split.train].copy())
    pred = np.asarray(predictor.predict(split.adata(split.test), source=inp.source), dtype=np.float32)
    # test cells without any vocabulary gene (NaN rows) get the training mean, as the mean baseline
    missing = np.isnan(pred).any(1)
    pred[missing] = b.mean_predictor(split.targets[split.train], int(missing.sum()))
    return pred


def _ridge_on(embedding: np.ndarray, split: Split) -> np.ndarray:
    return b.ridge(embedding[split.train], split.targets[split.train], embedding[split.test])


MODALITY = {
    "mean": lambda s: b.mean_predictor(s.targets[s.train], len(s.test)),
    "ridge": lambda s: b.ridge(s.pcs(s.train), s.targets[s.train], s.pcs(s.test)),
    "knn": lambda s: b.knn_regress(s.pcs(s.train), s.targets[s.train], s.pcs(s.test), k=s.cfg.k),
    "totalvi": _totalvi,
    "atlasformer": lambda s: _fit_modality(s, scratch=False),
    "atlasformer_scratch": lambda s: _fit_modality(s, scratch=True),
    **{name: (lambda s, a=name: _fit_modality(s, scratch=False, ablation=a)) for name in ABLATIONS},
    "atlasformer_zeroshot": lambda s: _ridge_on(cached_zero_shot(s.inp), s),
}
