"""Gene-gene attention networks per cell population: how much each gene's token attends to each other gene's token,
averaged over the cells of a group in which both genes are tokens.

A cell of n genes gives n * (n - 1) weighted gene pairs; they are scatter-added into sparse (genes, genes)
accumulators over the genes the group's cells hold, a batch of cells at a time, with no loop over genes.
"""

from __future__ import annotations

import os
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from atlasformer.finetune.common import (
    load_backbone,
    model_batch,
    model_gene_keys,
    to_inference_device,
    tokenize_for_model,
)
from atlasformer.finetune.config import FinetuneConfig
from atlasformer.tokenization import CellTokenizer, InputError, TokenizedCells
from atlasformer.tokenization.anndata_io import check_obs_key
from atlasformer.tokenization.outputs import write_csv_atomic

COLUMNS = ["group", "source_gene", "target_gene", "weight", "n_cells"]


def attention_network(adata: ad.AnnData, model, *, groupby: str, layer: int = -1,
                      heads: Literal["mean", "each"] | int = "mean", max_cells_per_group: int = 500,
                      top_edges: int = 100, min_cells: int = 10, gene_key: str | None = None,
                      counts_layer: str | None = None, batch_size: int = 16, seed: int = 0, cpu: bool = False,
                      write: str | os.PathLike | None = None) -> pd.DataFrame:
    """The strongest gene-gene attention edges of each cell population.

    For each group of ``obs[groupby]``, up to ``max_cells_per_group`` cells (a seeded subsample) are run through
    the model with ``output_attentions=True``. The weight of an edge source -> target is the attention of the
    source gene's token (query) to the target gene's token (key) in the chosen layer, averaged over the cells of
    the group in which both genes are tokens (``n_cells`` of them). ``<cls>`` and self-attention are left out.

    Parameters
    ----------
    adata
        Raw counts (``X``, or ``layers[counts_layer]``).
    model
        Model folder, hub id or shipped name (``"atlasformer-public-small"``), or a ``(model, tokenizer)`` pair.
    groupby
        obs column of the cell populations.
    layer
        Transformer layer whose attention is read (negative counts from the last).
    heads
        ``"mean"``: the mean over heads; ``"each"``: every head apart (a ``head`` column is added); an int: that
        head alone.
    max_cells_per_group
        Cells used per group at most.
    top_edges
        Edges kept per group (per group and head with ``heads="each"``), strongest first.
    min_cells
        Edges whose genes co-occur in fewer cells of the group are left out (an average over a cell or two is
        noise); lowered to the group's size for smaller groups.
    gene_key, counts_layer
        Where gene identifiers and counts are.
    batch_size
        Cells per forward pass (attention weights take batch * heads * layers * genes^2 floats).
    seed
        Seed of the per-group subsample.
    cpu
        Run on the CPU even when a GPU is available.
    write
        Also write the table to this CSV file.

    Returns
    -------
    pandas.DataFrame
        ``group``, (``head``,) ``source_gene``, ``target_gene``, ``weight``, ``n_cells``; genes named as
        ``adata``'s var names (or ``var[gene_key]``). ``attrs`` holds ``layer``, ``heads`` and ``cells_per_group``.
    """
    backbone, tokenizer = backbone_and_tokenizer(model, adata, gene_key)
    backbone = to_inference_device(backbone, cpu).eval()
    n_layers, n_heads = backbone.config.n_layers, backbone.config.n_heads
    if not -n_layers <= layer < n_layers:
        raise InputError(f"layer={layer} is not a layer of this {n_layers}-layer model; use 0..{n_layers - 1} or -1.")
    if not (heads in ("mean", "each") or (isinstance(heads, int) and 0 <= heads < n_heads)):
        raise InputError(f"heads must be 'mean', 'each' or a head index 0..{n_heads - 1}, got {heads!r}.")
    check_obs_key(adata.obs, groupby, source="data", what="groupby")
    data = tokenize_for_model(adata, tokenizer, layer=counts_layer, gene_key=gene_key)
    groups = data.obs[groupby].astype(str).to_numpy()
    names = gene_names(adata, tokenizer, gene_key)
    rng = np.random.default_rng(seed)
    tables, used = [], {}
    for group in pd.unique(groups):
        rows = np.flatnonzero(groups == group)
        if len(rows) > max_cells_per_group:
            rows = np.sort(rng.choice(rows, max_cells_per_group, replace=False))
        used[group] = len(rows)
        sums, counts, genes = group_attention(backbone, tokenizer, data.cells.subset(rows), layer, heads, batch_size)
        table = top_edge_table(sums, counts, genes, names, top_edges, min(min_cells, len(rows)))
        tables.append(table.assign(group=group))
    result = pd.concat(tables, ignore_index=True)
    order = ["group", "head", *COLUMNS[1:]] if heads == "each" else COLUMNS
    result = result[order]
    result.attrs.update(layer=layer, heads=heads, cells_per_group=used)
    if write is not None:
        write_csv_atomic(result, write)
    return result


def backbone_and_tokenizer(model, adata: ad.AnnData, gene_key: str | None):
    """The backbone and tokenizer of a model folder / hub id / shipped name, or of a ``(model, tokenizer)`` pair."""
    if isinstance(model, (str, os.PathLike)):
        backbone, tokenizer, _ = load_backbone(model, FinetuneConfig(), [adata], gene_key=gene_key)
        return backbone, tokenizer
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[1], CellTokenizer):
        net, tokenizer = model
        return getattr(net, "backbone", net), tokenizer
    raise InputError(f"model must be a model folder, hub id or shipped name, or a (model, tokenizer) pair; "
                     f"got {type(model).__name__}.")


def gene_names(adata: ad.AnnData, tokenizer: CellTokenizer, gene_key: str | None) -> dict[int, str]:
    """Vocabulary id -> the data's name of that gene (var name, or ``var[gene_key]``); first column wins."""
    ids = tokenizer.column_ids(model_gene_keys(adata, tokenizer, gene_key))
    labels = adata.var[gene_key] if gene_key else adata.var_names
    names: dict[int, str] = {}
    for i, label in zip(ids.tolist(), labels):
        if i >= 0:
            names.setdefault(i, str(label))
    return names


@torch.no_grad()
def group_attention(backbone, tokenizer: CellTokenizer, cells: TokenizedCells, layer: int, heads, batch_size: int
                    ) -> tuple[list[sp.csr_matrix], sp.csr_matrix, np.ndarray]:
    """Summed attention and co-occurrence counts of one group's cells over the genes they hold.

    Returns ``(sums, counts, genes)``: one (genes, genes) sum of weights per head kept (one for ``"mean"`` or a
    single head), the (genes, genes) number of cells holding both genes, and the vocabulary id of each row.
    """
    genes, local = np.unique(cells.gene_ids, return_inverse=True)  # the group's genes; each token's row among them
    n = len(genes)
    device = next(backbone.parameters()).device
    sums, counts = None, sp.csr_matrix((n, n), dtype=np.float64)
    for lo in range(0, len(cells), batch_size):
        rows = np.arange(lo, min(lo + batch_size, len(cells)))
        batch = {k: v.to(device) for k, v in model_batch(cells, rows, tokenizer).items()}
        weights = backbone(**batch, output_attentions=True).attentions[layer][:, :, 1:, 1:]  # (batch, heads, g, g)
        weights = heads_kept(weights, heads).cpu().numpy()  # (batch, kept heads, g, g)
        token_rows = padded_rows(local, cells.offsets[rows], cells.lengths[rows], weights.shape[-1])  # (batch, g)
        batch_sums, batch_counts = scatter_pairs(weights, token_rows, n)
        sums = batch_sums if sums is None else [a + b for a, b in zip(sums, batch_sums)]
        counts = counts + batch_counts
    return sums, counts, genes


def heads_kept(weights: torch.Tensor, heads) -> torch.Tensor:
    """(batch, kept heads, g, g): the mean over heads (one), every head, or one head."""
    if heads == "mean":
        return weights.mean(1, keepdim=True)
    return weights if heads == "each" else weights[:, heads : heads + 1]


def padded_rows(local: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """(batch, width) accumulator row of each gene token, laid out as the padded batch; -1 on padding."""
    out = np.full((len(starts), width), -1, dtype=np.int64)
    cell = np.repeat(np.arange(len(starts)), lengths)
    position = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[cell, position] = local[np.repeat(starts, lengths) + position]
    return out


def scatter_pairs(weights: np.ndarray, token_rows: np.ndarray, n: int) -> tuple[list[sp.csr_matrix], sp.csr_matrix]:
    """Scatter-add one batch's (batch, heads, g, g) weights into (n, n) sparse sums per head, and count the cells
    holding each gene pair; pairs with padding and a token with itself are skipped."""
    g = token_rows.shape[1]
    real = token_rows >= 0  # (batch, g)
    pair = real[:, :, None] & real[:, None, :] & ~np.eye(g, dtype=bool)  # (batch, g, g)
    cell, query, key = np.nonzero(pair)
    src, dst = token_rows[cell, query], token_rows[cell, key]  # (pairs,) accumulator rows and columns
    # a gene pair occurs at most once per cell (one token per gene), so summing ones counts cells
    counts = sp.coo_matrix((np.ones(len(src)), (src, dst)), shape=(n, n)).tocsr()
    sums = [sp.coo_matrix((weights[cell, h, query, key].astype(np.float64), (src, dst)), shape=(n, n)).tocsr()
            for h in range(weights.shape[1])]
    return sums, counts


def top_edge_table(sums: list[sp.csr_matrix], counts: sp.csr_matrix, genes: np.ndarray, names: dict[int, str],
                   top_edges: int, min_cells: int) -> pd.DataFrame:
    """The ``top_edges`` largest mean weights (sum / co-occurring cells) per head, among pairs in >= ``min_cells``."""
    counts = counts.tocoo()
    enough = counts.data >= min_cells
    rows, cols, n_cells = counts.row[enough], counts.col[enough], counts.data[enough]
    tables = []
    for head, summed in enumerate(sums):
        mean = np.asarray(summed[rows, cols]).ravel() / n_cells  # (pairs,) aligned with the counts' entries
        best = np.argsort(-mean, kind="stable")[:top_edges]
        tables.append(pd.DataFrame({
            "head": head, "source_gene": [names.get(int(i), str(i)) for i in genes[rows[best]]],
            "target_gene": [names.get(int(i), str(i)) for i in genes[cols[best]]],
            "weight": mean[best], "n_cells": n_cells[best].astype(np.int64)}))
    return pd.concat(tables, ignore_index=True)
