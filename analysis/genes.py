"""What a model knows about genes: gene embeddings, gene programs, and checks against known gene sets.

- :func:`gene_embeddings`: the input embedding of every vocabulary gene (rows of the gene embedding table) and,
  with data, a context-aware embedding (the mean output hidden state of the gene over the cells where it is a
  token), as the genes x dimensions AnnData of FORMATS.md.
- :func:`gene_programs`: Leiden clusters of a cosine kNN graph over the genes' embeddings; :func:`score_programs`
  scores each program per cell.
- :func:`gene_set_enrichment`: is a known gene set (ribosomal proteins, markers of a cell type) more cohesive in
  the embedding than random sets of genes the model was trained on as often?

Which genes were seen in pretraining. The vocabulary holds every gene counted in a few cells of the corpus, but a
cell's tokens are only its ``max_seq_len`` most expressed genes, so many vocabulary genes were never a token and
their embedding rows kept their random initialisation. Nothing in a model folder records which; this module
derives it in one of two ways (``uns['gene_embeddings']['seen_from']`` says which):

- ``"corpus"``: the corpus files are given. They are tokenized with the model's tokenizer and split into training
  and held-out cells exactly as pretraining did (:func:`atlasformer.pretrain.train.split_rows` with the run's
  ``eval_fraction`` and ``seed``); a gene was seen when it is a token of a training cell. On the shipped model's
  recipe this equals, gene for gene, the rows AdamW kept gradient statistics for (benchmarks/results/gene_programs.md).
- ``"weights"``: no corpus, but the folder records an atlasformer pretraining run started from random weights. A
  row no gradient reached is its N(0, 0.02^2) initialisation (``CellTransformerPreTrainedModel._init_weights``)
  shrunk by AdamW's decoupled weight decay, a factor known from the run's learning-rate schedule; its squared norm
  then follows a scaled chi-square with ``d_model`` degrees of freedom, and a row above that law's
  ``1 - UNTOUCHED_P`` quantile is called seen (99.96 % agreement with the corpus on the shipped model).
- otherwise (converted scGPT / Geneformer models, fine-tuned folders, a model object) every vocabulary gene is
  marked seen and ``seen_from`` is ``"unknown"``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from atlasformer.checkpoints import load_model_folder, read_manifest, resolve_model
from atlasformer.finetune.common import inference_device, model_batch, read_counts
from atlasformer.pretrain.train import lr_factor, split_rows
from atlasformer.tokenization import (
    CellTokenizer,
    InputError,
    column_token_ids,
    gene_keys,
    iter_tokenized,
    read_h5ad,
)
from atlasformer.tokenization.gene_ids import ENSEMBL_PATTERN, gene_tables

logger = logging.getLogger(__name__)

GENE_EMBEDDINGS_FILE = "gene_embeddings.h5ad"
"""File name ``atlasformer genes embed --output DIR`` writes into DIR (FORMATS.md)."""
CONTEXT_LAYER = "context"
"""``layers`` key of the context-aware embedding (NaN for genes that were a token of no cell)."""
EMBEDDING_INIT_STD = 0.02
"""Standard deviation of the gene embedding's initialisation (``CellTransformerPreTrainedModel._init_weights``)."""
UNTOUCHED_P = 1e-4
"""Upper-tail probability above which a row's norm is still taken as an untrained initialisation."""
PRETRAINING_KEYS = ("lr", "weight_decay", "warmup_steps", "max_steps", "min_lr_ratio", "objectives")


# ------------------------------------------------------------------------------------------- loading
def load_analysis_model(model) -> tuple[torch.nn.Module, CellTokenizer, dict]:
    """``(backbone, tokenizer, run_config)`` of a model name / folder / hub id, or of a ``(model, tokenizer)`` pair.

    ``run_config`` is the manifest's resolved run config (``{}`` for a pair or a folder without one).
    """
    if isinstance(model, tuple):
        if len(model) != 2 or not isinstance(model[1], CellTokenizer):
            raise InputError("model must be a name, a folder, a hub id or a (model, CellTokenizer) pair, as "
                             "atlasformer.checkpoints.load_model_folder returns.")
        network, tokenizer, run_config = model[0], model[1], {}
    else:
        folder = resolve_model(model)
        network, tokenizer = load_model_folder(folder)
        run_config = read_manifest(folder, verify=False).get("run_config") or {}
    backbone = network.backbone if hasattr(network, "backbone") else network
    return backbone, tokenizer, dict(run_config)


def vocabulary_metadata(tokenizer: CellTokenizer) -> pd.DataFrame:
    """Per vocabulary gene (special tokens left out), indexed by gene ID: ``token_id``, ``symbol``, ``ensembl_id``.

    An Ensembl key's symbol comes from the tokenizer's gene tables (its own table first, then the shipped human
    one); a key that is not an Ensembl ID is its own symbol, and its Ensembl ID is looked up the other way ('' when
    no table knows it).
    """
    vocab = tokenizer.vocab
    keys = pd.Index(vocab.genes, dtype=object)
    symbol_of: dict[str, str] = {}
    ensembl_of: dict[str, str] = {}
    for table in reversed(gene_tables(tokenizer.config.gene_table)):  # the first table wins: written last
        by_symbol = table.lookups["symbol"]
        symbol_of.update(zip(by_symbol.to_numpy(), by_symbol.index))
        ensembl_of.update(zip(by_symbol.index, by_symbol.to_numpy()))
    is_ensembl = np.asarray(keys.str.match(ENSEMBL_PATTERN), dtype=bool)
    symbols = [symbol_of.get(k, k) if ens else k for k, ens in zip(keys, is_ensembl)]
    ensembl = [k if ens else ensembl_of.get(k, "") for k, ens in zip(keys, is_ensembl)]
    ensembl = [e if re.match(ENSEMBL_PATTERN, e) else "" for e in ensembl]
    return pd.DataFrame({"token_id": vocab.lookup(keys), "symbol": symbols, "ensembl_id": ensembl}, index=keys)


# ---------------------------------------------------------------------------- seen in pretraining
def pretraining_token_counts(tokenizer: CellTokenizer, corpus: Sequence, *, eval_fraction: float = 0.05,
                             seed: int = 0, layer: str | None = None, gene_key: str | None = None) -> np.ndarray:
    """(vocab,) number of pretraining cells in which each token id was among the cell's tokens.

    Reproduces what pretraining on h5ad inputs fed the model: the files tokenized in order, cells without a
    vocabulary gene dropped, the held-out cells of ``split_rows(n_cells, eval_fraction, seed)`` left out.

    Parameters
    ----------
    tokenizer
        The model's tokenizer.
    corpus
        The pretraining inputs in the order pretraining was given them: AnnData objects or h5ad paths.
    eval_fraction, seed, layer, gene_key
        The pretraining run's settings (``atlasformer.json``'s ``run_config`` holds them).
    """
    if isinstance(corpus, (str, os.PathLike, ad.AnnData)):
        corpus = [corpus]
    gene_ids, lengths = [], []
    for item in corpus:
        source = str(item) if not isinstance(item, ad.AnnData) else "corpus"
        if not isinstance(item, ad.AnnData) and Path(item).is_dir():
            raise InputError(f"{item}: a folder; pass the h5ad files pretraining was given (a tokenized corpus "
                             "folder is not supported here).")
        adata = item if isinstance(item, ad.AnnData) else read_h5ad(item, backed=True)
        ids = column_token_ids(adata, tokenizer, layer=layer, gene_key=gene_key, source=source)
        for _, cells in iter_tokenized(adata, tokenizer, ids, layer=layer, source=source):
            gene_ids.append(cells.gene_ids)
            lengths.append(cells.lengths)
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    train_rows, _ = split_rows(len(lengths), eval_fraction, seed)
    in_training = np.repeat(np.isin(np.arange(len(lengths)), train_rows), lengths)  # (tokens,)
    tokens = np.concatenate(gene_ids) if gene_ids else np.zeros(0, np.int32)
    # a gene is at most once among a cell's tokens, so token counts are cell counts
    return np.bincount(tokens[in_training], minlength=len(tokenizer.vocab))


def trained_rows_from_weights(weight: np.ndarray, run_config: dict) -> np.ndarray | None:
    """(rows,) bool: embedding rows that left their random initialisation, or None when the run does not allow
    telling (no record of a pretraining run from random weights). See the module docstring for the test."""
    if not set(PRETRAINING_KEYS) <= set(run_config) or run_config.get("init_from"):
        return None
    lr, wd = float(run_config["lr"]), float(run_config["weight_decay"])
    steps, warmup, floor = int(run_config["max_steps"]), int(run_config["warmup_steps"]), float(run_config["min_lr_ratio"])
    # AdamW multiplies every weight by (1 - lr_t * wd) at each step, gradient or not
    log_decay = sum(math.log1p(-lr * lr_factor(s, warmup, steps, floor) * wd) for s in range(steps))
    sigma2 = (EMBEDDING_INIT_STD * math.exp(log_decay)) ** 2
    from scipy.stats import chi2

    threshold = chi2.isf(UNTOUCHED_P, weight.shape[1]) * sigma2
    return (weight.astype(np.float64) ** 2).sum(1) > threshold


# ---------------------------------------------------------------------------------------- embeddings
@torch.no_grad()
def context_embedding_sums(backbone: torch.nn.Module, tokenizer: CellTokenizer, adata: ad.AnnData, *,
                           layer: str | None = None, gene_key: str | None = None, batch_size: int = 64,
                           source: str = "data", device=None) -> tuple[np.ndarray, np.ndarray]:
    """Sum over cells of each token's output hidden state, and in how many cells it was a token.

    Returns ``(sums, n_cells)``: (vocab, d_model) float64 and (vocab,) int64; ``sums / n_cells`` is the mean.
    One scatter-add per batch, no loop over genes.
    """
    was_training = backbone.training
    backbone.eval()
    device = device or next(backbone.parameters()).device
    vocab_size, d = backbone.config.vocab_size, backbone.config.d_model
    sums = torch.zeros(vocab_size, d, dtype=torch.float64, device=device)
    n_cells = torch.zeros(vocab_size, dtype=torch.int64, device=device)
    ids = column_token_ids(adata, tokenizer, layer=layer, gene_key=gene_key, source=source)
    for _, cells in iter_tokenized(adata, tokenizer, ids, layer=layer, source=source):
        for start in range(0, len(cells), batch_size):
            rows = np.arange(start, min(start + batch_size, len(cells)))
            batch = {k: v.to(device) for k, v in model_batch(cells, rows, tokenizer).items()}
            hidden = backbone(**batch).hidden_states[:, 1:]  # (batch, seq - 1, d_model): <cls> left out
            token_ids = batch["input_ids"][:, 1:]  # (batch, seq - 1)
            real = batch["attention_mask"][:, 1:]  # (batch, seq - 1) bool
            sums.index_add_(0, token_ids[real], hidden[real].double())
            n_cells += torch.bincount(token_ids[real], minlength=vocab_size)
    backbone.train(was_training)
    return sums.cpu().numpy(), n_cells.cpu().numpy()


def _subsample_cells(adata: ad.AnnData, max_cells: int | None, seed: int) -> ad.AnnData:
    if max_cells is None or adata.n_obs <= max_cells:
        return adata
    rows = np.sort(np.random.default_rng(seed).choice(adata.n_obs, size=max_cells, replace=False))
    return adata[rows].to_memory() if adata.isbacked else adata[rows]


def gene_embeddings(model, *, data: ad.AnnData | str | os.PathLike | None = None, layer: str | None = None,
                    gene_key: str | None = None, corpus: Sequence | None = None, max_cells: int | None = 5000,
                    batch_size: int = 64, seed: int = 0, cpu: bool = False) -> ad.AnnData:
    """Embeddings of every vocabulary gene: the input embedding and, with ``data``, a context-aware one.

    Parameters
    ----------
    model
        A shipped model's name, a model folder or hub id, or a ``(model, tokenizer)`` pair.
    data
        AnnData (or h5ad path) of raw counts for the context-aware embedding; None for the input embedding only.
    layer, gene_key
        Where ``data``'s counts and gene identifiers are.
    corpus
        The files the model was pretrained on, in their pretraining order, to tell exactly which genes it saw
        (module docstring; read with the run's ``layer`` / ``gene_key``, split with its ``eval_fraction`` /
        ``seed``, defaults for a ``(model, tokenizer)`` pair); None derives it from the weights where the model
        folder allows.
    max_cells
        At most this many cells of ``data`` (a seeded random subset); None for all.
    batch_size, seed, cpu
        Cells per forward pass, the subset's seed, and inference on the CPU even where a GPU is present.

    Returns
    -------
    AnnData
        Genes x dimensions (FORMATS.md): ``X`` the input embedding (the rows of the gene embedding table, before the
        model's LayerNorm); ``obs_names`` the vocabulary's gene IDs; ``obs['symbol']``, ``obs['ensembl_id']``,
        ``obs['seen_in_pretraining']`` (bool), ``obs['token_id']``; with ``corpus`` ``obs['pretraining_cells']``
        (training cells in which the gene was a token); with ``data`` ``layers['context']`` (mean output hidden
        state over the cells of ``data`` where the gene is a token, NaN where it is none) and
        ``obs['n_cells_seen']`` (that number of cells); ``uns['gene_embeddings']`` how it was made.
    """
    backbone, tokenizer, run_config = load_analysis_model(model)
    backbone = backbone.to(inference_device(cpu))
    meta = vocabulary_metadata(tokenizer)
    rows = meta["token_id"].to_numpy()
    weight = backbone.embeddings.genes.weight.detach().float().cpu().numpy()  # (vocab, d_model)
    out = ad.AnnData(X=weight[rows].copy(), obs=meta.copy(),
                     var=pd.DataFrame(index=[f"dim_{i}" for i in range(weight.shape[1])]))
    info = {"model": str(model) if not isinstance(model, tuple) else "(model, tokenizer)"}
    if corpus is not None:
        counts = pretraining_token_counts(
            tokenizer, corpus, eval_fraction=float(run_config.get("eval_fraction", 0.05)),
            seed=int(run_config.get("seed", 0)), layer=run_config.get("layer"), gene_key=run_config.get("gene_key"))
        out.obs["pretraining_cells"] = counts[rows]
        out.obs["seen_in_pretraining"] = counts[rows] > 0
        info["seen_from"] = "corpus"
    else:
        trained = trained_rows_from_weights(weight, run_config)
        info["seen_from"] = "weights" if trained is not None else "unknown"
        if trained is None:
            logger.warning("%s: nothing tells which genes were seen in pretraining (no corpus given, no record of a "
                           "pretraining run from random weights); every vocabulary gene is marked seen. Pass "
                           "corpus=[the pretraining h5ad files] to know.", info["model"])
            trained = np.ones(len(weight), dtype=bool)
        out.obs["seen_in_pretraining"] = trained[rows]
    if data is not None:
        source = str(data) if not isinstance(data, ad.AnnData) else "data"
        adata = data if isinstance(data, ad.AnnData) else read_h5ad(data, backed=True)
        adata = _subsample_cells(adata, max_cells, seed)
        sums, n_cells = context_embedding_sums(backbone, tokenizer, adata, layer=layer, gene_key=gene_key,
                                               batch_size=batch_size, source=source)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (sums / n_cells[:, None]).astype(np.float32)  # NaN where the gene was never a token
        out.layers[CONTEXT_LAYER] = means[rows]
        out.obs["n_cells_seen"] = n_cells[rows]
        info.update(data=source, n_cells=int(adata.n_obs), layer=layer or "X")
    info["n_seen"] = int(out.obs["seen_in_pretraining"].sum())
    out.uns["gene_embeddings"] = info
    return out


# ---------------------------------------------------------------------------------------- programs
def embedding_matrix(gene_adata: ad.AnnData, use_rep: str | None = None) -> np.ndarray:
    """(genes, dims) representation: ``X`` (None), a layer (e.g. ``"context"``) or an ``obsm`` key."""
    if use_rep is None or use_rep == "X":
        matrix = gene_adata.X
    elif use_rep in gene_adata.layers:
        matrix = gene_adata.layers[use_rep]
    elif use_rep in gene_adata.obsm:
        matrix = gene_adata.obsm[use_rep]
    else:
        raise InputError(f"use_rep={use_rep!r} is neither a layer ({list(gene_adata.layers)}) nor an obsm key "
                         f"({list(gene_adata.obsm)}) of the gene embeddings; use None for X or 'context' for the "
                         "context-aware embedding (gene_embeddings(..., data=...)).")
    return np.asarray(matrix.toarray() if sp.issparse(matrix) else matrix, dtype=np.float64)


def usable_genes(gene_adata: ad.AnnData, use_rep: str | None = None, seen_only: bool = True) -> np.ndarray:
    """(genes,) bool: seen in pretraining (unless ``seen_only`` is False) with a finite, non-zero embedding."""
    matrix = embedding_matrix(gene_adata, use_rep)
    usable = np.isfinite(matrix).all(1) & (np.abs(matrix).sum(1) > 0)
    if seen_only and "seen_in_pretraining" in gene_adata.obs:
        usable &= gene_adata.obs["seen_in_pretraining"].to_numpy(dtype=bool)
    return usable


def centered_usable(gene_adata: ad.AnnData, use_rep: str | None, usable: np.ndarray, center: bool) -> np.ndarray:
    """(usable genes, dims) embeddings, minus their mean when ``center``.

    Cosines are taken around the mean gene: a direction every gene shares says nothing about any one gene, and
    it is large in transformer outputs (on the shipped model the mean context-aware embedding has 90 % of a
    gene's norm, so raw cosines are ~0.9 for any pair).
    """
    matrix = embedding_matrix(gene_adata, use_rep)[usable]
    return matrix - matrix.mean(0) if center else matrix


def gene_programs(gene_adata: ad.AnnData, *, n_neighbors: int = 15, resolution: float = 1.0,
                  use_rep: str | None = None, seed: int = 0, min_size: int = 5, seen_only: bool = True,
                  center: bool = True, method: str = "umap", key_added: str = "program") -> pd.DataFrame:
    """Gene programs: Leiden clusters of the cosine kNN graph over the genes' embeddings.

    Parameters
    ----------
    gene_adata
        Output of :func:`gene_embeddings`.
    n_neighbors, resolution, seed, method
        ``sc.pp.neighbors`` (exact cosine neighbours; ``method`` ``"umap"`` or ``"gauss"`` connectivities, the
        latter without umap's numba compilation, ~15 s once per process) and ``sc.tl.leiden`` (igraph) settings.
    use_rep
        None for the input embedding ``X``, ``"context"`` for the context-aware one, or an ``obsm`` key.
    min_size
        Clusters with fewer genes are no program (their genes get no label).
    seen_only
        Cluster only genes seen in pretraining: an unseen gene's input embedding is its untrained initialisation.
    center
        Subtract the mean embedding of the clustered genes first (:func:`centered_usable`).

    Returns
    -------
    DataFrame
        One row per program, largest first, indexed by program name: ``n_genes``, ``gene_ids`` and ``symbols``
        (lists). Writes ``gene_adata.obs[key_added]`` (categorical; NaN for genes in no program) and
        ``gene_adata.uns[key_added]`` (the settings).
    """
    import scanpy as sc

    usable = usable_genes(gene_adata, use_rep, seen_only)
    if usable.sum() <= n_neighbors:
        raise InputError(f"only {int(usable.sum())} genes are usable for programs (seen in pretraining, with an "
                         f"embedding{' under ' + repr(use_rep) if use_rep else ''}); need more than n_neighbors="
                         f"{n_neighbors}. Lower n_neighbors or pass seen_only=False.")
    genes = ad.AnnData(X=centered_usable(gene_adata, use_rep, usable, center).astype(np.float32),
                       obs=pd.DataFrame(index=gene_adata.obs_names[usable]))
    # exact neighbours (sklearn), reproducible; scanpy 1.11's pynndescent path also fails under scipy 1.17 (getnnz)
    sc.pp.neighbors(genes, n_neighbors=n_neighbors, use_rep="X", metric="cosine", transformer="sklearn",
                    method=method, random_state=seed)
    sc.tl.leiden(genes, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False,
                 key_added="cluster")
    clusters = genes.obs["cluster"].astype(str)
    sizes = clusters.value_counts()
    kept = [c for c in sizes.index if sizes[c] >= min_size]  # value_counts: largest first
    labels = pd.Series(np.nan, index=gene_adata.obs_names, dtype=object)
    for new, old in enumerate(kept):
        labels[clusters.index[clusters == old]] = str(new)
    gene_adata.obs[key_added] = pd.Categorical(labels, categories=[str(i) for i in range(len(kept))])
    gene_adata.uns[key_added] = {"n_neighbors": n_neighbors, "resolution": resolution, "use_rep": use_rep or "X",
                                 "seed": seed, "min_size": min_size, "seen_only": seen_only, "center": center, "method": method,
                                 "n_genes_clustered": int(usable.sum())}
    return program_table(gene_adata, key_added)


def program_table(gene_adata: ad.AnnData, key: str = "program") -> pd.DataFrame:
    """The programs of ``gene_adata.obs[key]`` as :func:`gene_programs` returns them."""
    if key not in gene_adata.obs:
        raise InputError(f"gene embeddings have no obs[{key!r}]; run gene_programs(gene_adata, key_added={key!r}).")
    labels, symbols = gene_adata.obs[key], gene_adata.obs.get("symbol", gene_adata.obs_names.to_series())
    rows = []
    for program in labels.cat.categories:
        members = labels.index[labels == program]
        rows.append({"program": program, "n_genes": len(members), "gene_ids": list(members),
                     "symbols": list(symbols[members])})
    return pd.DataFrame(rows, columns=["program", "n_genes", "gene_ids", "symbols"]).set_index("program")


def score_programs(adata: ad.AnnData, programs: pd.DataFrame | dict[str, Iterable[str]], *, layer: str | None = None,
                   gene_key: str | None = None, key_prefix: str = "program_", gene_id_mode: str = "resolve",
                   gene_table: str | None = None, ctrl_size: int = 50, random_state: int = 0) -> list[str]:
    """Score each program in each cell (``sc.tl.score_genes`` on a log-normalised copy of the counts).

    Parameters
    ----------
    adata
        Raw counts in ``X`` or ``layers[layer]``; only new ``obs`` columns are written into it.
    programs
        :func:`gene_programs`' table (its ``gene_ids``) or a dict program -> gene IDs.
    gene_key, gene_id_mode, gene_table
        How ``adata``'s genes are resolved to the model's gene IDs: as the model's tokenizer does
        (``tokenizer.config.gene_id_mode`` / ``gene_table``; the defaults are those of the shipped model).
    ctrl_size, random_state
        ``sc.tl.score_genes`` settings (control genes per expression bin, seed).

    Returns
    -------
    list of str
        The ``obs`` columns written, ``f"{key_prefix}{program}"``: mean log-normalised expression of the program's
        genes minus that of expression-matched control genes. Programs with no gene in ``adata`` are skipped
        with a warning.
    """
    import scanpy as sc

    members = ({str(p): list(g) for p, g in programs["gene_ids"].items()} if isinstance(programs, pd.DataFrame)
               else {str(p): list(g) for p, g in programs.items()})
    keys = gene_keys(adata, gene_key, gene_id_mode=gene_id_mode, gene_table=gene_table)
    normalised = ad.AnnData(X=read_counts(adata, layer=layer), obs=pd.DataFrame(index=adata.obs_names))
    sc.pp.normalize_total(normalised, target_sum=1e4)  # over every gene, keyed or not: the library size
    sc.pp.log1p(normalised)
    keep = ~pd.isna(keys) & ~pd.Index(keys).duplicated()  # columns of one gene: the first is scored
    normalised = normalised[:, np.flatnonzero(keep)].copy()
    normalised.var_names = pd.Index(keys[keep], dtype=str)
    written = []
    for program, genes in members.items():
        present = [g for g in genes if g in normalised.var_names]
        if not present:
            logger.warning("program %s: none of its %d genes is in the data; not scored.", program, len(genes))
            continue
        name = f"{key_prefix}{program}"
        sc.tl.score_genes(normalised, present, ctrl_size=ctrl_size, score_name=name, random_state=random_state,
                          use_raw=False)
        adata.obs[name] = normalised.obs[name].to_numpy()
        written.append(name)
    if not written:
        raise InputError("no program has a gene in the data: were the programs made with the model whose gene IDs "
                         "the data resolves to (gene_key / gene_id_mode)?")
    return written


# ------------------------------------------------------------------------------------ validation
RIBOSOMAL_PROTEIN = re.compile(r"^RP[LS]\d+[A-Z]{0,2}\d?$|^RPLP[012]$|^RPSA$")
"""Cytosolic ribosomal protein symbols (RPL13A, RPS4Y1, RPL7L1, RPLP0, ...)."""
MARKER_SETS = {
    # canonical PBMC markers (Seurat's PBMC 3k tutorial and the 10x / Zheng 2017 sorted populations)
    "T cell": ["CD3D", "CD3E", "CD3G", "CD2", "IL7R", "CD247", "LCK", "CD28", "CD5", "CD6", "LEF1", "TCF7"],
    "B cell": ["CD79A", "CD79B", "MS4A1", "CD19", "CD22", "BANK1", "PAX5", "FCRLA", "VPREB3", "TCL1A", "BLK"],
    "monocyte": ["CD14", "LYZ", "S100A8", "S100A9", "S100A12", "FCN1", "VCAN", "CSF1R", "CD68", "MNDA"],
    "NK cell": ["NKG7", "GNLY", "KLRD1", "KLRF1", "PRF1", "GZMB", "GZMA", "NCR1", "KLRC1"],
    "platelet": ["PPBP", "PF4", "GP9", "ITGA2B", "TUBB1", "GNG11", "CLU", "NRGN"],
    "erythrocyte": ["HBB", "HBA1", "HBA2", "HBD", "HBM", "ALAS2"],
}
"""Marker genes of PBMC cell types, by symbol."""


def is_ribosomal_protein(symbol: str) -> bool:
    """A cytosolic ribosomal protein gene: not a pseudogene (RPL13AP5), a binding protein (RPS19BP1) nor an S6
    kinase (RPS6KA1)."""
    return bool(RIBOSOMAL_PROTEIN.match(symbol)) and not re.search(r"(\dA?P|BP)\d+$", symbol) \
        and not symbol.startswith("RPS6K")


def reference_gene_sets(gene_adata: ad.AnnData) -> dict[str, list[str]]:
    """Known gene sets by symbol: ribosomal proteins (RPL* / RPS* / RPLP*, pseudogenes left out), mitochondrially
    encoded genes (MT-*), HLA class II (HLA-D*), and :data:`MARKER_SETS`. Pattern sets are expanded over
    ``gene_adata.obs['symbol']``."""
    symbols = pd.Index(gene_adata.obs["symbol"].astype(str))
    sets = {
        "ribosomal": [s for s in symbols if is_ribosomal_protein(s)],
        "mitochondrial": [s for s in symbols if s.startswith("MT-")],
        "HLA class II": [s for s in symbols if s.startswith("HLA-D")],
    }
    return {**sets, **{name: list(genes) for name, genes in MARKER_SETS.items()}}


def _set_positions(gene_adata: ad.AnnData, genes: Iterable[str]) -> np.ndarray:
    """Row positions of ``genes`` (symbols or gene IDs) in ``gene_adata``."""
    by_id = pd.Series(np.arange(gene_adata.n_obs), index=gene_adata.obs_names)
    symbols = gene_adata.obs["symbol"].astype(str) if "symbol" in gene_adata.obs else pd.Series(dtype=str)
    by_symbol = pd.Series(np.arange(gene_adata.n_obs), index=symbols.to_numpy())
    by_symbol = by_symbol[~by_symbol.index.duplicated()]
    found = [by_id[g] if g in by_id.index else by_symbol.get(g) for g in dict.fromkeys(genes)]
    return np.asarray(sorted({int(p) for p in found if p is not None}), dtype=np.int64)


def mean_pairwise_cosine(unit: np.ndarray) -> np.ndarray:
    """Mean cosine over the pairs of each set: (..., k, d) unit vectors -> (...). From ``|sum|^2 = k + 2 sum_pairs``."""
    k = unit.shape[-2]
    total = unit.sum(-2)  # (..., d)
    return ((total**2).sum(-1) - k) / (k * (k - 1))


def frequency_bins(frequency: np.ndarray, n_bins: int) -> np.ndarray:
    """(genes,) quantile bin of each gene's log1p(frequency), ties broken by position."""
    ranks = pd.Series(np.log1p(frequency)).rank(method="first").to_numpy()
    return np.minimum(((ranks - 1) * n_bins / len(ranks)).astype(np.int64), n_bins - 1)


def matched_random_sets(bins: np.ndarray, member_bins: np.ndarray, n_sets: int, rng: np.random.Generator) -> np.ndarray:
    """(n_sets, k) random sets of positions into the universe: as many genes from each bin as the set has there,
    drawn without replacement within a set."""
    columns = []
    for b in np.unique(member_bins):
        pool = np.flatnonzero(bins == b)
        need = int((member_bins == b).sum())
        picks = rng.random((n_sets, len(pool))).argpartition(need - 1, axis=1)[:, :need]  # (n_sets, need)
        columns.append(pool[picks])
    return np.concatenate(columns, axis=1)


def _largest_share(codes: np.ndarray, n_codes: int) -> np.ndarray:
    """(..., k) program codes (-1 = none) -> (...) fraction of the k genes in the commonest program."""
    if n_codes == 0:
        return np.zeros(codes.shape[:-1])
    one_hot = (codes[..., None] == np.arange(n_codes)).sum(-2)  # (..., n_codes)
    return one_hot.max(-1) / codes.shape[-1]


def gene_set_enrichment(gene_adata: ad.AnnData, gene_sets: dict[str, Iterable[str]] | None = None, *,
                        n_permutations: int = 1000, seed: int = 0, use_rep: str | None = None,
                        match_on: str | None = "auto", n_bins: int = 10, seen_only: bool = True,
                        center: bool = True, program_key: str = "program", min_genes: int = 3) -> pd.DataFrame:
    """How cohesive each gene set is in the embedding, against random gene sets of the same size.

    Cohesion is the mean pairwise cosine similarity (around the mean gene, ``center``) of the set's members that
    are in the vocabulary and usable (seen in pretraining, with an embedding). The null draws ``n_permutations``
    random sets of that size from the usable genes, matched on frequency: the usable genes are cut into ``n_bins``
    quantile bins of log1p(``obs[match_on]``) and each random set takes as many genes from each bin as the set
    has there. Matching matters: a frequent gene's embedding got more updates, and frequent genes may share
    directions for that reason alone.

    Parameters
    ----------
    gene_adata
        Output of :func:`gene_embeddings`.
    gene_sets
        Set name -> symbols or gene IDs; default :func:`reference_gene_sets`.
    n_permutations, seed
        Random sets per gene set, and their seed.
    use_rep
        None for the input embedding ``X``, ``"context"`` for the context-aware one, or an ``obsm`` key.
    match_on
        obs column of per-gene frequency; ``"auto"``: ``pretraining_cells`` (cells the gene was a token of in
        pretraining) if present, else ``n_cells_seen`` (in the data embedded), else no matching; None: no matching.
    n_bins
        Frequency bins of the matching.
    seen_only
        Only genes seen in pretraining take part (members and null).
    center
        Cosines around the mean usable gene (:func:`centered_usable`); False for raw cosines.
    program_key
        obs column of :func:`gene_programs`' labels for ``program_fraction`` (skipped when absent).
    min_genes
        Sets with fewer usable members get NaN statistics.

    Returns
    -------
    DataFrame
        Indexed by set: ``n_genes`` (given), ``n_present`` (usable members), ``cohesion``, ``null_mean``,
        ``null_sd``, ``effect`` ((cohesion - null_mean) / null_sd), ``p_value`` ((1 + #null >= cohesion) /
        (1 + n_permutations)), ``matched_on``; with programs ``program`` (the commonest among members),
        ``program_fraction`` (share of usable members in it), ``program_fraction_null`` (its mean over the random
        sets) and ``program_p_value``; ``members`` (usable members' symbols, comma-joined).
    """
    gene_sets = reference_gene_sets(gene_adata) if gene_sets is None else gene_sets
    usable = usable_genes(gene_adata, use_rep, seen_only)
    universe = np.flatnonzero(usable)
    matrix = centered_usable(gene_adata, use_rep, usable, center)
    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)  # (universe, d)
    if match_on == "auto":
        match_on = next((c for c in ("pretraining_cells", "n_cells_seen") if c in gene_adata.obs), None)
    if match_on is not None and match_on not in gene_adata.obs:
        raise InputError(f"match_on={match_on!r} is not an obs column of the gene embeddings; use 'auto', None or "
                         f"one of {list(gene_adata.obs.columns)}.")
    bins = (frequency_bins(gene_adata.obs[match_on].to_numpy(dtype=np.float64)[universe], n_bins) if match_on
            else np.zeros(len(universe), np.int64))  # one bin: unmatched
    codes, n_codes = None, 0
    if program_key in gene_adata.obs:
        codes = gene_adata.obs[program_key].cat.codes.to_numpy()[universe]
        n_codes = len(gene_adata.obs[program_key].cat.categories)
    where = pd.Series(np.arange(len(universe)), index=universe)
    symbols = gene_adata.obs["symbol"].astype(str).to_numpy() if "symbol" in gene_adata.obs else gene_adata.obs_names
    rng = np.random.default_rng(seed)
    rows = []
    for name, genes in gene_sets.items():
        genes = list(genes)
        positions = _set_positions(gene_adata, genes)
        members = where.reindex(positions).dropna().astype(np.int64).to_numpy()  # positions in the universe
        row = {"set": name, "n_genes": len(genes), "n_present": len(members), "matched_on": match_on or "none",
               "members": ",".join(symbols[universe[members]])}
        if len(members) >= min_genes:
            observed = float(mean_pairwise_cosine(unit[members]))
            draws = matched_random_sets(bins, bins[members], n_permutations, rng)  # (n_permutations, k)
            null = mean_pairwise_cosine(unit[draws])  # (n_permutations,)
            row.update(cohesion=observed, null_mean=float(null.mean()), null_sd=float(null.std(ddof=1)),
                       effect=float((observed - null.mean()) / null.std(ddof=1)),
                       p_value=float((1 + (null >= observed).sum()) / (1 + n_permutations)))
            if codes is not None:
                member_codes = codes[members]
                counts = np.bincount(member_codes[member_codes >= 0], minlength=max(n_codes, 1))
                share = float(_largest_share(member_codes, n_codes))
                null_share = _largest_share(codes[draws], n_codes)
                row.update(program=str(gene_adata.obs[program_key].cat.categories[counts.argmax()])
                           if counts.sum() else "none", program_fraction=share,
                           program_fraction_null=float(null_share.mean()),
                           program_p_value=float((1 + (null_share >= share).sum()) / (1 + n_permutations)))
        rows.append(row)
    columns = ["set", "n_genes", "n_present", "cohesion", "null_mean", "null_sd", "effect", "p_value", "matched_on"]
    if codes is not None:
        columns += ["program", "program_fraction", "program_fraction_null", "program_p_value"]
    return pd.DataFrame(rows).reindex(columns=columns + ["members"]).set_index("set")
