"""Tokenizer half of the scGPT and Geneformer converters, and the restricted unpickler for Geneformer's files.

- scGPT: ``vocab.json`` (token -> id) becomes a :class:`GeneVocab` with the same ids and its specials
  (``<pad>``, ``<cls>``, ``<eoc>``), and a binned :class:`TokenizerConfig` as scGPT's (51 bins by
  default, bin indices fed to its continuous value encoder; the model config carries scGPT's mask
  value -1, and padded values are masked out of attention whatever they hold).
- Geneformer: the token dictionary and gene-median pickles become a rank-value tokenizer.

scGPT keys genes by symbol and Geneformer by Ensembl ID. Gene symbols are mapped to the canonical
vocabulary key (the Ensembl ID where the gene table knows one, see :mod:`.gene_ids`) keeping each
token's id, so both converted vocabularies match files with symbols or Ensembl IDs alike.

Geneformer's dictionaries are pickles. :func:`safe_load_pickle` unpickles them with an allow-list of
plain containers, strings and numbers (numpy scalars and numeric arrays included); any other import
the file asks for is refused before anything runs. ``atlasformer.checkpoints`` locates and reads the
checkpoint's files, calls these and the weight half (``atlasformer.model_zoo.convert_scgpt`` /
``convert_geneformer``), and writes the model folder.
"""

from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd

from .anndata_io import InputError
from .gene_ids import ROUTES, gene_tables, resolve_names
from .tokenizer import CellTokenizer, TokenizerConfig
from .vocab import CLS, GeneVocab

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray

TOKEN_DICTIONARY_GLOB = "*token_dictionary*.pkl"
GENE_MEDIANS_GLOB = "*gene_median*.pkl"
_LEAVES = (str, bytes, int, float, bool, type(None), np.bool_, np.integer, np.floating)


# ---------------------------------------------------------------------------------- safe unpickling
def _numeric_dtype(spec, align=False, copy=False):
    """``numpy.dtype`` for numbers and strings only (object dtypes could hold anything)."""
    dtype = np.dtype(spec, align, copy)
    if dtype.kind not in "biufcSU":
        raise pickle.UnpicklingError(f"numpy dtype {dtype} is not a plain number or string type")
    return dtype


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: latin-1 only."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


SAFE_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,  # protocol <= 2 names builtins as Python 2 did
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "dtype"): _numeric_dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
}
"""The only globals a pickle may name: containers and numpy's number reconstruction, nothing that runs code."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`SAFE_GLOBALS`; anything else raises before it is imported."""

    def find_class(self, module: str, name: str):
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id")


def _check_plain(obj, path, depth: int = 0) -> None:
    if depth > 20:
        raise InputError(f"{path}: nested too deeply for a dictionary file.")
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_plain(key, path, depth + 1)
            _check_plain(value, path, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            _check_plain(item, path, depth + 1)
    elif isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biufcSU":
            raise InputError(f"{path}: holds a numpy array of dtype {obj.dtype}; only numeric arrays are accepted.")
    elif not isinstance(obj, _LEAVES):
        raise InputError(f"{path}: holds a {type(obj).__name__}; only containers, strings and numbers are accepted.")


def safe_load_pickle(path: str | os.PathLike):
    """Unpickle a data file that may only hold containers, strings and numbers (never code).

    Raises :class:`InputError` naming the refused import when the pickle asks for anything else, e.g.
    ``os.system`` through ``__reduce__``; nothing from the file runs.
    """
    path = Path(path)
    try:
        obj = RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()
    except pickle.UnpicklingError as err:
        raise InputError(f"{path}: {err}. Only plain containers, strings and numbers are accepted from pickles; "
                         "this file may have been tampered with.") from err
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise InputError(f"{path}: not a readable dictionary pickle ({type(err).__name__}: {err}).") from err
    _check_plain(obj, path)
    return obj


# ------------------------------------------------------------------------------------------- scGPT
def read_token_ids(mapping: dict, source: str) -> dict[str, int]:
    """``{token: id}`` with plain str/int types, checked to cover ids 0..n-1 exactly once."""
    if not isinstance(mapping, dict) or not mapping:
        raise InputError(f"{source}: expected a non-empty token -> id dictionary.")
    try:
        out = {str(tok): int(i) for tok, i in mapping.items()}
    except (TypeError, ValueError) as err:
        raise InputError(f"{source}: token ids must be integers ({err}).") from err
    if sorted(out.values()) != list(range(len(out))):
        raise InputError(f"{source}: token ids are not 0..{len(out) - 1} without gaps or repeats.")
    return out


def canonical_gene_keys(token_ids: dict[str, int]) -> tuple[dict[str, int], dict]:
    """Map gene tokens (symbols) to canonical vocabulary keys, keeping every token's id.

    A symbol whose key another token already holds (an alias of a gene the vocabulary also lists by its
    official symbol; the better route, then the lower id, wins) keeps its own name, so ids stay one-to-one.
    """
    specials = [t for t in token_ids if t.startswith("<") and t.endswith(">")]
    genes = [t for t in sorted(token_ids, key=token_ids.get) if t not in set(specials)]
    resolution = resolve_names([pd.Series(genes, dtype=object)], gene_tables(), source="vocab.json")
    rank = {route: i for i, route in enumerate((*ROUTES, "dropped"))}
    order = sorted(range(len(genes)), key=lambda i: (rank[resolution.routes[i]], token_ids[genes[i]]))
    taken = set(specials)
    keys: list[str | None] = [None] * len(genes)
    for i in order:  # best-resolved first: each claims its canonical key if still free
        key = resolution.keys[i]
        if key is not None and key not in taken:
            keys[i] = key
            taken.add(key)
    for i, gene in enumerate(genes):  # the rest keep their name (names are unique in vocab.json)
        if keys[i] is None:
            keys[i] = gene if gene not in taken else f"{gene}#{token_ids[gene]}"
            taken.add(keys[i])
    mapped = {tok: token_ids[tok] for tok in specials}
    mapped.update({key: token_ids[gene] for key, gene in zip(keys, genes)})
    renamed = sum(k != g for k, g in zip(keys, genes))
    report = {"n_genes": len(genes), "n_renamed_to_canonical": int(renamed),
              "routes": {r: int(n) for r, n in resolution.report.routes.items() if n}}
    return mapped, report


def scgpt_tokenizer(vocab: dict, args: dict | None = None, *, canonical_keys: bool = True,
                    source: str = "vocab.json") -> tuple[CellTokenizer, dict]:
    """The tokenizer of an scGPT checkpoint from its ``vocab.json`` mapping and ``args.json``.

    Binned values (``n_bins`` from args, default 51) with scGPT's per-cell quantile bins; up to
    ``max_seq_len - 1`` genes per cell (scGPT's ``max_seq_len`` counts ``<cls>``; default 1,200 genes).
    Returns ``(tokenizer, report)``.
    """
    args = args or {}
    token_ids = read_token_ids(vocab, source)
    pad = args.get("pad_token", "<pad>")
    for required in (pad, CLS):
        if required not in token_ids:
            raise InputError(f"{source}: the scGPT vocabulary lacks {required}; is this scGPT's vocab.json?")
    if pad != "<pad>":
        token_ids["<pad>"] = token_ids.pop(pad)
    report: dict = {"n_tokens": len(token_ids)}
    if canonical_keys:
        token_ids, report["gene_keys"] = canonical_gene_keys(token_ids)
    gene_vocab = GeneVocab(token_to_id=token_ids)
    config = TokenizerConfig(
        kind="binned", n_bins=int(args.get("n_bins", 51)), max_seq_len=int(args.get("max_seq_len", 1201)) - 1,
        selection="subsample", special_tokens=tuple(sorted(gene_vocab.specials, key=token_ids.get)),
        gene_id_mode="resolve" if canonical_keys else "raw",
    )
    return CellTokenizer(gene_vocab, config), report


# --------------------------------------------------------------------------------------- Geneformer
def geneformer_tokenizer(token_dictionary: dict, gene_medians: dict, *, max_seq_len: int,
                         source: str = "token dictionary") -> tuple[CellTokenizer, dict]:
    """The rank-value tokenizer of a Geneformer checkpoint from its token dictionary and gene medians.

    A dictionary without ``<cls>`` (Geneformer V1) gets one appended as the last id, since atlasformer
    batches always start with it; ``report["n_added_tokens"]`` says how many were added.
    """
    token_ids = read_token_ids(token_dictionary, source)
    if "<pad>" not in token_ids:
        raise InputError(f"{source}: the Geneformer dictionary lacks <pad>.")
    added = [] if CLS in token_ids else [CLS]
    for tok in added:
        token_ids[tok] = len(token_ids)
    gene_vocab = GeneVocab(token_to_id=token_ids)
    medians = {}
    for gene in gene_vocab.genes:
        value = gene_medians.get(gene)
        if value is None:
            continue
        value = float(value)
        if not np.isfinite(value) or value <= 0:
            raise InputError(f"gene medians: {gene} has median {value}; medians must be positive.")
        medians[gene] = value
    missing = [g for g in gene_vocab.genes if g not in medians]
    if missing:
        raise InputError(f"gene medians lack {len(missing)} of the dictionary's genes (e.g. {missing[:3]}); "
                         "the median file does not belong to this token dictionary.")
    config = TokenizerConfig(kind="rank", max_seq_len=max_seq_len, selection="top",
                             special_tokens=tuple(sorted(gene_vocab.specials, key=token_ids.get)))
    report = {"n_tokens": len(token_ids), "n_added_tokens": len(added), "added_tokens": added}
    return CellTokenizer(gene_vocab, config, gene_medians=medians), report


def find_geneformer_dictionaries(search_root: str | os.PathLike, vocab_size: int, *, token_dictionary=None,
                                 gene_medians=None) -> tuple[Path, Path]:
    """Pick the token dictionary (with ``vocab_size`` entries) and gene-median pickles under ``search_root``.

    Geneformer repositories keep several dictionary versions (``geneformer/*.pkl``,
    ``geneformer/gene_dictionaries_30m/*.pkl``); the one whose size matches the model's vocabulary wins,
    and the median file covering most of its genes. Explicit paths skip the search.
    """
    root = Path(search_root)
    if token_dictionary is None:
        candidates = sorted(root.rglob(TOKEN_DICTIONARY_GLOB))
        sizes = {path: len(safe_load_pickle(path)) for path in candidates}
        fitting = [p for p, n in sizes.items() if n == vocab_size]
        if not fitting:
            found = {str(p.relative_to(root)): n for p, n in sizes.items()}
            raise InputError(f"{root}: no Geneformer token dictionary ({TOKEN_DICTIONARY_GLOB}) with {vocab_size} tokens "
                             f"(found {found or 'none'}); pass token_dictionary= / --token-dictionary.")
        token_dictionary = fitting[0]
    if gene_medians is None:
        tokens = set(read_token_ids(safe_load_pickle(token_dictionary), str(token_dictionary)))
        candidates = sorted(root.rglob(GENE_MEDIANS_GLOB))
        overlap = {path: len(tokens & set(safe_load_pickle(path))) for path in candidates}
        if not overlap or max(overlap.values()) == 0:
            raise InputError(f"{root}: no gene-median pickle ({GENE_MEDIANS_GLOB}) for this token dictionary; "
                             "pass gene_medians= / --gene-medians.")
        gene_medians = max(overlap, key=overlap.get)
    return Path(token_dictionary), Path(gene_medians)

