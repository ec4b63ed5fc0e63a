"""In-silico perturbation (Geneformer's InSilicoPerturber, scGPT's perturbation idea): delete a gene's token from
a cell, or over-express it, re-embed the cell and measure how far, and where to, its embedding moves.

Perturbed copies of many cells and many genes are built at once from the ragged token arrays (numpy, no loop over
cells) and run through the model in shared batches, so a forward pass mixes genes and cells.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch

from atlasformer.checkpoints import load_model_folder, resolve_model
from atlasformer.finetune.common import model_batch, model_gene_keys, to_inference_device, tokenize_for_model
from atlasformer.tokenization import CellTokenizer, InputError, TokenizedCells
from atlasformer.tokenization.anndata_io import check_obs_key

logger = logging.getLogger(__name__)

COPIES_PER_CHUNK = 2048
"""Perturbed copies built before they are run: bounds memory (about 3 KB per copy of 256 genes)."""


# ------------------------------------------------------------------------------------------ public API
def perturb_genes(adata: ad.AnnData, model, genes, *, mode: Literal["delete", "overexpress"] = "delete",
                  cells=None, target: str | None = None, batch_size: int = 64, gene_key: str | None = None,
                  counts_layer: str | None = None, cpu: bool = False) -> pd.DataFrame:
    """Perturb genes in each cell, re-embed, and measure the shift of the cell embedding.

    Parameters
    ----------
    adata
        Raw counts (``X``, or ``layers[counts_layer]``).
    model
        Model folder, hub id or shipped name (``"atlasformer-public-small"``), or a ``(model, tokenizer)`` pair.
    genes
        What to perturb, each on its own: a gene name, a list of names (one perturbation each), a list holding
        lists of names (each list a gene set perturbed together, named by its genes joined with ``+``), or a
        mapping name -> gene list. Names are ``adata``'s var names (or ``var[gene_key]``) or vocabulary keys.
    mode
        ``"delete"``: remove the genes' tokens (cells expressing none of them are skipped). ``"overexpress"``:
        put the genes at the top of the cell: the highest bin (binned), the cell's highest value (continuous),
        or the first ranks in the set's order (rank-value); genes the cell does not express are inserted, and a
        cell already at ``max_seq_len`` genes loses its lowest-expressed (last-ranked) ones, as the tokenizer would.
    cells
        Which cells to perturb: None (all), ``"obs_key=value"``, a bool mask over ``adata``'s cells, or obs names.
    target
        ``"obs_key=value"``: the state to move cells to. Adds ``target_shift``, how much closer (in cosine) each
        perturbed cell is to the mean embedding of those cells than before.
    batch_size
        Perturbed copies per forward pass (copies of different cells and genes share a batch).
    gene_key, counts_layer
        Where gene identifiers and counts are.
    cpu
        Run on the CPU even when a GPU is available.

    Returns
    -------
    pandas.DataFrame
        One row per perturbation and cell: ``perturbation`` (gene or set name), ``cell`` (obs name),
        ``n_expressed`` (the set's genes the cell had as tokens), ``cosine_shift`` (1 - cosine of the cell's
        embeddings before and after), ``expression_shift`` (when the model has an MVC or value head: mean absolute
        change of the predicted values of the cell's other genes, in the head's units) and, with ``target``,
        ``target_shift``. ``attrs`` holds ``mode``, ``target``, ``expression_head``, ``n_copies`` and
        ``genes_x_cells_per_s`` (perturbed copies built, embedded and scored per second).
    """
    if mode not in ("delete", "overexpress"):
        raise InputError(f"mode must be 'delete' or 'overexpress', got {mode!r}.")
    net, tokenizer = model_and_tokenizer(model)
    net = to_inference_device(net, cpu).eval()
    lookup = gene_lookup(adata, tokenizer, gene_key)
    set_ids = {name: vocabulary_ids(members, lookup, tokenizer) for name, members in named_gene_sets(genes).items()}
    data = tokenize_for_model(adata, tokenizer, layer=counts_layer, gene_key=gene_key)
    chosen = np.flatnonzero(cell_mask(adata, cells, what="cells")[data.cells.cell_index])
    if not len(chosen):
        raise InputError(f"cells={cells!r} selects no cell with vocabulary genes; nothing to perturb.")
    original = data.cells.subset(chosen)  # (cells,) the perturbed copies' sources
    base = embed_tokens(net, tokenizer, original, batch_size)
    centroid = target_centroid(net, tokenizer, adata, data.cells, target, batch_size)

    start, parts, n_copies = time.perf_counter(), [], 0
    for copies in perturbed_chunks(original, set_ids, mode, tokenizer):
        parts.append(score_copies(net, tokenizer, copies, base, centroid, batch_size))
        n_copies += len(copies.cells)
    seconds = time.perf_counter() - start
    if not parts:
        raise InputError(f"none of the chosen cells holds any of {list(set_ids)[:5]} among its tokens (a cell's "
                         f"{tokenizer.config.max_seq_len} most expressed genes), so deleting them changes nothing; "
                         "choose genes the cells express, or mode='overexpress'.")
    table = pd.concat(parts, ignore_index=True)
    names = list(set_ids)
    table.insert(0, "perturbation", pd.Categorical.from_codes(table.pop("set_index"), categories=names))
    table.insert(1, "cell", adata.obs_names[original.cell_index[table.pop("source_cell")]])
    table.attrs.update(mode=mode, target=target, expression_head=base.head, n_copies=n_copies,
                       genes_x_cells_per_s=n_copies / seconds if seconds > 0 else float("nan"))
    logger.info("%d perturbed copies in %.1f s (%.1f genes x cells per s)", n_copies, seconds,
                table.attrs["genes_x_cells_per_s"])
    return table


def rank_genes_by_effect(results: pd.DataFrame, *, by: str | None = None, min_cells: int = 1) -> pd.DataFrame:
    """Rank the perturbations of :func:`perturb_genes` by their mean effect over cells.

    Parameters
    ----------
    results
        :func:`perturb_genes`' table.
    by
        The column to rank by: ``"target_shift"`` (default when present: moving cells toward the target first,
        away from it last), ``"cosine_shift"`` (default otherwise: largest shift first) or ``"expression_shift"``.
    min_cells
        Perturbations scored on fewer cells are left out.

    Returns
    -------
    pandas.DataFrame
        One row per perturbation, best first: ``perturbation``, ``n_cells``, the mean of every effect column,
        ``std`` of the ranked one and, when ranking by ``target_shift``, ``fraction_toward`` (cells moved closer)
        and ``direction`` (``"toward"`` or ``"away"``).
    """
    by = by or ("target_shift" if "target_shift" in results else "cosine_shift")
    if by not in results:
        raise InputError(f"by={by!r} is not a column of the results; columns: {list(results.columns)}.")
    effects = [c for c in ("cosine_shift", "expression_shift", "target_shift") if c in results]
    grouped = results.groupby("perturbation", observed=True)
    table = grouped[effects].mean()
    table.insert(0, "n_cells", grouped.size())
    table[f"{by}_std"] = grouped[by].std()
    if by == "target_shift":
        table["fraction_toward"] = grouped["target_shift"].apply(lambda s: float((s > 0).mean()))
        table["direction"] = np.where(table["target_shift"] > 0, "toward", "away")
    table = table[table["n_cells"] >= min_cells].sort_values(by, ascending=False)
    return table.reset_index()


# ------------------------------------------------------------------------------------------ inputs
def model_and_tokenizer(model):
    """``(model, tokenizer)`` of a model folder, hub id or shipped name, or of a pair passed in."""
    if isinstance(model, (str, os.PathLike)):
        return load_model_folder(resolve_model(model))
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[1], CellTokenizer):
        return model
    raise InputError(f"model must be a model folder, hub id or shipped name, or a (model, tokenizer) pair; "
                     f"got {type(model).__name__}.")


def named_gene_sets(genes) -> dict[str, list[str]]:
    """name -> genes of each perturbation: a name alone, a list (of names or of gene sets) or a mapping."""
    if isinstance(genes, str):
        return {genes: [genes]}
    if isinstance(genes, Mapping):
        sets = {str(name): [members] if isinstance(members, str) else list(members) for name, members in genes.items()}
    elif isinstance(genes, Sequence | np.ndarray | pd.Index):
        sets = {}
        for item in genes:
            members = [item] if isinstance(item, str) else [str(g) for g in item]
            sets["+".join(members)] = members
    else:
        raise InputError(f"genes must be a gene name, a list of names or gene sets, or a mapping; got {type(genes).__name__}.")
    empty = [name for name, members in sets.items() if not members]
    if not sets or empty:
        raise InputError(f"genes holds no gene to perturb{f' (empty sets: {empty})' if empty else ''}.")
    return sets


def gene_lookup(adata: ad.AnnData, tokenizer: CellTokenizer, gene_key: str | None) -> dict[str, int]:
    """Gene name -> vocabulary id for the data's genes the model knows: var names, ``var[gene_key]`` values and
    their resolved keys (resolving gene IDs is slow: done once per call, not per gene set)."""
    keys = model_gene_keys(adata, tokenizer, gene_key)
    column_ids = tokenizer.column_ids(keys)
    lookup = {}
    for labels in ([keys, adata.var_names] + ([adata.var[gene_key]] if gene_key else [])):
        lookup.update({str(n): int(i) for n, i in zip(labels, column_ids) if i >= 0})
    return lookup


def vocabulary_ids(names: list[str], lookup: dict[str, int], tokenizer: CellTokenizer) -> np.ndarray:
    """Vocabulary ids of ``names`` (through :func:`gene_lookup`, else as vocabulary keys), in their order."""
    ids = [lookup.get(n, int(tokenizer.vocab.lookup([n])[0])) for n in names]
    unknown = [n for n, i in zip(names, ids) if i < 0]
    if unknown:
        raise InputError(f"genes {unknown[:10]} are neither genes of the data that the model knows nor vocabulary keys; "
                         "name them as var_names (or var[gene_key]) does.")
    return np.asarray(list(dict.fromkeys(ids)), dtype=np.int64)  # a gene named twice is perturbed once


def parse_obs_selector(text: str, adata: ad.AnnData, what: str) -> tuple[str, str]:
    """``"obs_key=value"`` -> ``(key, value)``, with errors naming the problem and the fix."""
    key, sep, value = str(text).partition("=")
    if not sep:
        raise InputError(f"{what}={text!r} must read 'obs_key=value', e.g. 'condition=stim'.")
    check_obs_key(adata.obs, key, source="data", what=what)
    if not (adata.obs[key].astype(str) == value).any():
        examples = sorted(adata.obs[key].astype(str).unique())[:10]
        raise InputError(f"{what}={text!r} matches no cell: obs[{key!r}] holds {examples}.")
    return key, value


def cell_mask(adata: ad.AnnData, cells, *, what: str) -> np.ndarray:
    """(n_obs,) bool mask of ``cells``: None (all), ``"obs_key=value"``, a bool mask or obs names."""
    if cells is None:
        return np.ones(adata.n_obs, dtype=bool)
    if isinstance(cells, str):
        key, value = parse_obs_selector(cells, adata, what)
        return (adata.obs[key].astype(str) == value).to_numpy()
    cells = np.asarray(cells)
    if cells.dtype == bool:
        if cells.shape != (adata.n_obs,):
            raise InputError(f"a bool mask for {what} needs {adata.n_obs} entries (one per cell), got {cells.shape}.")
        return cells
    mask = adata.obs_names.isin(cells.astype(str))
    if mask.sum() != len(np.unique(cells)):
        missing = sorted(set(cells.astype(str)) - set(adata.obs_names))[:5]
        raise InputError(f"{what}: {missing} are not obs names of the data; pass obs names, a bool mask or 'key=value'.")
    return mask


# ------------------------------------------------------------------------------------------ perturbing tokens
@dataclass
class PerturbedCells:
    """Perturbed copies of cells, as ragged tokens, with what each token and copy came from."""

    cells: TokenizedCells
    """The copies; ``cell_index`` holds each copy's source cell (a position in the perturbed TokenizedCells)."""
    source: np.ndarray
    """(tokens,) int64 index of each token in the source cells' flat arrays; -1 for an inserted gene."""
    perturbed: np.ndarray
    """(tokens,) bool: the token is one of the perturbed genes."""
    set_index: np.ndarray
    """(copies,) int64 which perturbation made the copy."""
    n_expressed: np.ndarray
    """(copies,) int64 genes of the set the source cell had as tokens."""


def perturb_tokens(cells: TokenizedCells, rows: np.ndarray, gene_ids: np.ndarray, mode: str, tokenizer: CellTokenizer,
                   set_index: int = 0) -> PerturbedCells:
    """Copies of the cells at ``rows`` with the genes ``gene_ids`` (vocabulary ids, in set order) deleted or
    over-expressed (see :func:`perturb_genes` for what that means per tokenizer kind); vectorised over cells."""
    rows = np.asarray(rows, dtype=np.int64)
    lengths = cells.lengths[rows]
    copy_of = np.repeat(np.arange(len(rows)), lengths)  # (tokens,) copy of each token
    first = np.cumsum(lengths) - lengths  # (copies,) first token of each copy
    position = np.arange(int(lengths.sum())) - first[copy_of]  # (tokens,) position within its cell
    source = cells.offsets[rows][copy_of] + position
    genes, values = cells.gene_ids[source], cells.values[source]
    hit = np.isin(genes, gene_ids)
    n_expressed = np.bincount(copy_of[hit], minlength=len(rows))
    if mode == "delete":
        keep = ~hit
        return PerturbedCells(ragged(copy_of[keep], genes[keep], values[keep], rows, len(rows)), source[keep],
                              hit[keep], np.full(len(rows), set_index), n_expressed)
    return overexpress_tokens(copy_of, position, source, genes, values, hit, rows, gene_ids, tokenizer, set_index,
                              n_expressed)


def overexpress_tokens(copy_of, position, source, genes, values, hit, rows, gene_ids, tokenizer, set_index,
                       n_expressed) -> PerturbedCells:
    """The over-expression half of :func:`perturb_tokens`: raise the set's tokens, insert the missing genes, order
    and trim each copy as the tokenizer would have."""
    n_copies, k = len(rows), len(gene_ids)
    cfg = tokenizer.config
    lengths = np.bincount(copy_of, minlength=n_copies)  # (copies,) every source cell has tokens
    # the top of the cell: the highest bin, or the cell's own highest value (continuous, rank)
    top = (np.full(n_copies, cfg.n_bins - 1, np.float32) if cfg.kind == "binned"
           else np.maximum.reduceat(values, np.cumsum(lengths) - lengths))
    order_in_set = np.argsort(gene_ids)
    set_rank = np.empty(len(genes), np.int64)  # each hit token's place in the set
    set_rank[hit] = order_in_set[np.searchsorted(gene_ids[order_in_set], genes[hit])]
    values = values.copy()
    values[hit] = top[copy_of[hit]]
    present = np.zeros((n_copies, k), dtype=bool)
    present[copy_of[hit], set_rank[hit]] = True
    new_copy, new_rank = np.nonzero(~present)  # (inserted,) genes the cell did not express
    copy_of = np.concatenate([copy_of, new_copy])
    genes = np.concatenate([genes, gene_ids[new_rank]])
    values = np.concatenate([values, top[new_copy]])
    source = np.concatenate([source, np.full(len(new_copy), -1)])
    perturbed = np.concatenate([hit, np.ones(len(new_copy), bool)])
    if cfg.kind == "rank":  # the set first, in its order, then the cell's genes in their rank order
        order_key = np.where(perturbed, np.concatenate([set_rank, new_rank]), k + np.concatenate([position, lengths[new_copy]]))
        drop_first = (-order_key,)  # trimmed from the last rank
    else:  # column order kept (no positions: order does not matter); inserted genes after the cell's own
        order_key = np.concatenate([position, lengths[new_copy] + new_rank])
        drop_first = (-order_key, values, perturbed)  # lowest values first (later columns among ties), never the set
    keep = within_length(copy_of, drop_first, cfg.max_seq_len, n_copies)
    copy_of, genes, values, source, perturbed, order_key = (a[keep] for a in (copy_of, genes, values, source, perturbed,
                                                                              order_key))
    order = np.lexsort((order_key, copy_of))
    return PerturbedCells(ragged(copy_of[order], genes[order], values[order], rows, n_copies), source[order],
                          perturbed[order], np.full(n_copies, set_index), n_expressed)


def within_length(copy_of: np.ndarray, drop_keys: tuple, max_len: int, n_copies: int) -> np.ndarray:
    """Keep mask leaving at most ``max_len`` tokens per copy: the first tokens of each copy in ``np.lexsort`` order of
    ``drop_keys`` (last key primary) are dropped until the copy fits."""
    excess = np.maximum(np.bincount(copy_of, minlength=n_copies) - max_len, 0)  # (copies,)
    if not excess.any():
        return np.ones(len(copy_of), dtype=bool)
    order = np.lexsort((*drop_keys, copy_of))  # by copy, then drop order
    counts = np.bincount(copy_of, minlength=n_copies)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    return rank >= excess[copy_of]


def ragged(copy_of: np.ndarray, genes: np.ndarray, values: np.ndarray, rows: np.ndarray, n_copies: int) -> TokenizedCells:
    """TokenizedCells from tokens sorted by copy; ``cell_index`` is each copy's source row."""
    offsets = np.zeros(n_copies + 1, dtype=np.int64)
    np.cumsum(np.bincount(copy_of, minlength=n_copies), out=offsets[1:])
    return TokenizedCells(offsets, genes.astype(np.int32), values.astype(np.float32), np.asarray(rows, np.int64))


def perturbed_chunks(original: TokenizedCells, set_ids: dict[str, np.ndarray], mode: str, tokenizer: CellTokenizer):
    """Yield :class:`PerturbedCells` of about :data:`COPIES_PER_CHUNK` copies, mixing perturbations; deletions skip
    cells that express none of the set's genes (nothing to delete)."""
    cell_of_token = np.repeat(np.arange(len(original)), original.lengths)
    pending, size = [], 0
    for index, ids in enumerate(set_ids.values()):
        rows = np.arange(len(original))
        if mode == "delete":
            rows = np.unique(cell_of_token[np.isin(original.gene_ids, ids)])
        for lo in range(0, len(rows), COPIES_PER_CHUNK):
            pending.append(perturb_tokens(original, rows[lo:lo + COPIES_PER_CHUNK], ids, mode, tokenizer, index))
            size += len(pending[-1].cells)
            if size >= COPIES_PER_CHUNK:
                yield concatenate(pending)
                pending, size = [], 0
    if pending:
        yield concatenate(pending)


def concatenate(parts: list[PerturbedCells]) -> PerturbedCells:
    return PerturbedCells(TokenizedCells.concatenate([p.cells for p in parts]),
                          *(np.concatenate([getattr(p, f) for p in parts])
                            for f in ("source", "perturbed", "set_index", "n_expressed")))


# ------------------------------------------------------------------------------------------ model passes
@dataclass
class Embedded:
    """Cell embeddings and per-token predicted values (flat, aligned with the cells' tokens) of one model pass."""

    embedding: np.ndarray  # (cells, d_model)
    predicted: np.ndarray | None  # (tokens,) or None when the model has no expression head
    head: str | None  # "mvc", "value" or None


@torch.no_grad()
def embed_tokens(net, tokenizer: CellTokenizer, cells: TokenizedCells, batch_size: int) -> Embedded:
    """Embed ``cells`` in batches and predict each token's value with the model's MVC head (from the cell embedding,
    scGPT's GEPC) or else its value head (from the token's output); no head: no predictions."""
    backbone = getattr(net, "backbone", net)
    mvc, value = getattr(net, "mvc_head", None), getattr(net, "value_head", None)
    head = "mvc" if mvc is not None else "value" if value is not None else None
    device = next(net.parameters()).device
    embeddings, predicted = [], []
    for lo in range(0, len(cells), batch_size):
        batch = {k: v.to(device) for k, v in model_batch(cells, np.arange(lo, min(lo + batch_size, len(cells))),
                                                         tokenizer).items()}
        out = backbone(**batch)
        embeddings.append(out.cell_embedding.float().cpu().numpy())
        if head is None:
            continue
        if head == "mvc":  # (batch, seq) values of each token's gene given the cell embedding
            values = mvc(backbone.embeddings.gene_embedding(batch["input_ids"]), out.cell_embedding)
        else:
            values = expected_value(value(out.hidden_states), net.config.value_head)  # (batch, seq)
        real = batch["attention_mask"].clone()
        real[:, 0] = False  # <cls>
        predicted.append(values.float()[real].cpu().numpy())  # row-major: the cells' tokens in order
    return Embedded(np.concatenate(embeddings), np.concatenate(predicted) if head else None, head)


def expected_value(out: torch.Tensor, value_head: str) -> torch.Tensor:
    """A value head's prediction as a number: the expected bin of bin logits, or the scalar itself."""
    if value_head != "bins":
        return out
    bins = torch.arange(out.shape[-1], device=out.device, dtype=torch.float32)
    return out.float().softmax(-1) @ bins  # (..., ) for (..., n_bins)


def target_centroid(net, tokenizer, adata, cells: TokenizedCells, target: str | None, batch_size: int):
    """(d_model,) mean embedding of the ``target`` cells (``"obs_key=value"``), unperturbed; None without target."""
    if target is None:
        return None
    in_target = cell_mask(adata, target, what="target")[cells.cell_index]
    if not in_target.any():
        raise InputError(f"target={target!r}: none of its cells has vocabulary genes; no target state to move to.")
    return embed_tokens(net, tokenizer, cells.subset(np.flatnonzero(in_target)), batch_size).embedding.mean(0)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (n, d) arrays (``b`` may be one (d,) vector)."""
    norm = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.where(norm > 0, norm, np.nan)


def score_copies(net, tokenizer, copies: PerturbedCells, base: Embedded, centroid, batch_size: int) -> pd.DataFrame:
    """Embed the copies and compare them with their source cells (``base``): one row per copy."""
    after = embed_tokens(net, tokenizer, copies.cells, batch_size)
    source_cell = copies.cells.cell_index
    before = base.embedding[source_cell]  # (copies, d_model)
    table = {"set_index": copies.set_index, "source_cell": source_cell, "n_expressed": copies.n_expressed,
             "cosine_shift": 1.0 - cosine(after.embedding, before)}
    if after.predicted is not None:
        other = (copies.source >= 0) & ~copies.perturbed  # the cell's other genes, still in the copy
        copy_of = np.repeat(np.arange(len(copies.cells)), copies.cells.lengths)[other]
        change = np.abs(after.predicted[other] - base.predicted[copies.source[other]])
        n = np.bincount(copy_of, minlength=len(copies.cells))
        table["expression_shift"] = np.bincount(copy_of, weights=change, minlength=len(copies.cells)) / np.where(n, n, np.nan)
    if centroid is not None:
        table["target_shift"] = cosine(after.embedding, centroid) - cosine(before, centroid)
    return pd.DataFrame(table)
