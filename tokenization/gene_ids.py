"""Gene identifiers: resolve a file's genes to one canonical vocabulary key per gene.

The canonical key is the gene's Ensembl ID without version where a gene table knows it, otherwise the
name as given (an Ensembl-looking name loses its version suffix). So a file with HGNC symbols, one
with Ensembl IDs and one with versioned Ensembl IDs share tokens.

Routes, tried in this order for every identifier the file holds (``var_names`` first, then the var
columns in :data:`IDENTIFIER_COLUMNS`), the first hit winning:

1. ``ensembl`` / ``ensembl_versioned``: an Ensembl gene ID (``ENSG...``, ``ENSMUSG...``), with or
   without a ``.N`` version suffix, listed in a table;
2. ``symbol``: an official symbol (exact case);
3. ``alias``: a previous or alias symbol (exact case) that names exactly one gene. An alias that names
   several genes is ambiguous and not used; an alias that is also some gene's official symbol never
   reaches this route, because the official symbol wins;
4. ``uppercase``: the upper-cased name matched to upper-cased symbols, then aliases, with the same
   rules. This is the cross-species fallback: mouse ``Cd8a`` resolves to human ``CD8A``;
5. ``unresolved``: kept under its own name (a vocabulary built from the data contains it).

Dropped genes (no key): names that are row numbers (``'0'``, ``'1'``: the file lost its gene names)
or empty. Columns that resolve to the same key (an old and a new symbol of one gene, as in files that
merge several references) are merged: the tokenizer sums their counts per cell.

Tables: the shipped human table (``data/human_genes.tsv.gz``, from Bioconductor org.Hs.eg.db 3.16.0)
and optionally a user table for another species or an ortholog mapping (:func:`load_gene_table`),
which is consulted before the human table on every route.
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd

from .anndata_io import InputError

HUMAN_TABLE = "human_genes.tsv.gz"
ROUTES = ("ensembl", "ensembl_versioned", "symbol", "alias", "uppercase", "unresolved")
"""Resolution routes, best first; genes without a key get the pseudo-route ``dropped``."""
IDENTIFIER_COLUMNS = (
    "gene_ids", "ensembl_id", "gene_id", "feature_id",
    "gene_symbol", "feature_name", "gene_short_name", "gene_name", "gene_symbols", "symbol",
)
"""var columns searched for identifiers, after ``var_names``, when no ``gene_key`` is given."""
ENSEMBL_PATTERN = r"^(ENS[A-Z]*G\d{11})(\.\d+)?$"
ENSEMBL_SPECIES = {"ENSG": "human", "ENSMUSG": "mouse", "ENSRNOG": "rat", "ENSDARG": "zebrafish", "ENSMMUG": "macaque"}
_NOT_NAMES = {"", "nan", "none", "na", "<na>"}
_VERSION = re.compile(r"\.\d+$")
_LIST_LIMIT = 50


@dataclass(frozen=True)
class GeneTable:
    """Identifier -> canonical key lookups of one gene table (only unambiguous identifiers are kept)."""

    name: str
    lookups: dict[str, pd.Series]
    """Route -> Series (identifier -> key); routes ``ensembl``, ``symbol``, ``alias``, ``symbol_upper``, ``alias_upper``."""
    ambiguous_aliases: frozenset[str]
    """Aliases (exact and upper-cased) that name several genes and so resolve nothing."""
    n_genes: int


def _unique_map(pairs: list[tuple[str, str]], preferred: set[str] = frozenset()) -> tuple[pd.Series, set[str]]:
    """(identifier, key) pairs -> identifier -> key where the identifier names one key; the rest are ambiguous.

    ``preferred`` keys break a tie: when exactly one of an identifier's keys is preferred (a gene with
    an Ensembl ID over placeholder records of the same symbol), that key wins.
    """
    keys_of: dict[str, set[str]] = {}
    for ident, key in pairs:
        if ident:
            keys_of.setdefault(ident, set()).add(key)
    mapping, ambiguous = {}, set()
    for ident, keys in keys_of.items():
        if len(keys) > 1:
            keys = keys & preferred
        if len(keys) == 1:
            mapping[ident] = next(iter(keys))
        else:
            ambiguous.add(ident)
    return pd.Series(mapping, dtype=object), ambiguous


def _names(cell: str) -> list[str]:
    return [name.strip() for name in cell.split("|") if name.strip()]


def build_gene_table(table: pd.DataFrame, name: str) -> GeneTable:
    """Lookups from a table with ``ensembl_id`` and/or ``symbol`` ('|'-joined), optional ``aliases`` and ``key``.

    A row is one gene. Its key is the ``key`` column where given, else its first Ensembl ID (without
    version), else its symbol. Without a ``key`` column every listed Ensembl ID resolves to itself;
    with one, to its row's key. A symbol naming several keys resolves only when exactly one of them
    has an Ensembl ID; an identifier naming several keys is otherwise ambiguous and resolves nothing.
    """
    if not {"ensembl_id", "symbol"} & set(table.columns):
        raise InputError(f"{name}: a gene table needs an 'ensembl_id' or a 'symbol' column; found {list(table.columns)}.")

    def column(col: str) -> list[str]:
        return table[col].fillna("").astype(str).tolist() if col in table else [""] * len(table)

    ens_pairs, symbol_pairs, alias_pairs, with_ensembl = [], [], [], set()
    for ens_cell, symbol, alias_cell, given_key in zip(column("ensembl_id"), column("symbol"), column("aliases"),
                                                       column("key")):
        ensembl = [_VERSION.sub("", i) for i in _names(ens_cell)]
        symbol = symbol.strip()
        key = given_key.strip() or (ensembl[0] if ensembl else symbol)
        if not key:
            continue
        if ensembl:
            with_ensembl.add(key)
        ens_pairs += [(i, key if given_key.strip() else i) for i in ensembl]  # without a key column: itself
        symbol_pairs.append((symbol, key))
        alias_pairs += [(a, key) for a in _names(alias_cell)]
    symbols = {s for s, _ in symbol_pairs}
    alias_pairs = [(a, k) for a, k in alias_pairs if a not in symbols]  # official symbol wins
    upper_symbols = {s.upper() for s in symbols}
    upper_alias_pairs = [(a.upper(), k) for a, k in alias_pairs if a.upper() not in upper_symbols]
    by_ensembl, _ = _unique_map(ens_pairs)
    by_symbol, _ = _unique_map(symbol_pairs, with_ensembl)
    by_alias, alias_ambiguous = _unique_map(alias_pairs)
    by_symbol_upper, _ = _unique_map([(s.upper(), k) for s, k in symbol_pairs], with_ensembl)
    by_alias_upper, upper_ambiguous = _unique_map(upper_alias_pairs)
    lookups = {
        "ensembl": by_ensembl, "symbol": by_symbol, "alias": by_alias,
        "symbol_upper": by_symbol_upper, "alias_upper": by_alias_upper,
    }
    return GeneTable(name, lookups, frozenset(alias_ambiguous | upper_ambiguous), len(symbol_pairs))


@functools.lru_cache(maxsize=8)
def load_gene_table(path: str | None = None) -> GeneTable:
    """The shipped human table (``path=None``) or a user TSV, parsed once per process.

    A user table is a tab-separated file with a header and one row per gene, columns:

    - ``ensembl_id``: Ensembl gene ID(s) of the gene, '|'-joined, version suffixes ignored;
    - ``symbol``: official symbol;
    - ``aliases`` (optional): other names, '|'-joined;
    - ``key`` (optional): the vocabulary key the row resolves to, default its first Ensembl ID, else its
      symbol. An ortholog table (e.g. mouse -> human) lists the mouse ``ensembl_id`` and ``symbol`` and
      the human Ensembl ID as ``key``, so mouse files share tokens with human ones.
    """
    if path is None:
        source = files("atlasformer.tokenization") / "data" / HUMAN_TABLE
        with source.open("rb") as handle:
            table = pd.read_csv(handle, sep="\t", dtype=str, keep_default_na=False, compression="gzip")
        return build_gene_table(table, "human (org.Hs.eg.db 3.16.0)")
    file = Path(path)
    if not file.exists():
        raise InputError(f"{file}: gene table not found; pass a TSV with ensembl_id/symbol[/aliases/key] columns.")
    try:
        table = pd.read_csv(file, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise InputError(f"{file}: cannot be read as a tab-separated gene table ({err}).") from err
    return build_gene_table(table, str(file))


def gene_tables(gene_table: str | os.PathLike | None = None) -> tuple[GeneTable, ...]:
    """Tables consulted in order: the user's table (if any), then the shipped human table."""
    human = load_gene_table(None)
    return (load_gene_table(str(Path(gene_table).resolve())), human) if gene_table else (human,)


@dataclass
class GeneIdReport:
    """How one file's genes were resolved."""

    source: str
    n_genes: int
    routes: dict[str, int]
    """Genes per route (:data:`ROUTES` plus ``dropped``)."""
    n_expressed: int | None = None
    """Genes with any count (set once the counts were read)."""
    resolved_fraction: float | None = None
    """Fraction of expressed genes resolved through a gene table (the overlap with the table)."""
    species: str = "unknown"
    """Guess: human, mouse, rat, ... (Ensembl prefix), "non-human (symbols matched upper-cased)" or unknown."""
    ambiguous: list[str] = field(default_factory=list)
    """Names left unresolved because their alias names several genes (first 50)."""
    merged: list[str] = field(default_factory=list)
    """Names sharing their key with a better-resolved (then earlier) column; counts are summed (first 50)."""
    n_merged: int = 0
    not_identifiers: list[str] = field(default_factory=list)
    """Names dropped because they are row numbers or empty (first 50)."""

    @property
    def n_resolved(self) -> int:
        return sum(n for route, n in self.routes.items() if route not in ("unresolved", "dropped"))

    def summary(self) -> str:
        routes = ", ".join(f"{route} {n}" for route, n in self.routes.items() if n)
        overlap = "" if self.resolved_fraction is None else f"; {self.resolved_fraction:.1%} of expressed genes resolved"
        merged = f"; {self.n_merged} merged into a column with the same key" if self.n_merged else ""
        return (f"{self.source}: {self.n_resolved}/{self.n_genes} genes resolved ({routes}){overlap}{merged}; "
                f"species {self.species}")


@dataclass
class GeneResolution:
    """Canonical key of each column of one file (``None`` where the column is dropped)."""

    keys: np.ndarray
    """(genes,) object: canonical key, or None."""
    routes: np.ndarray
    """(genes,) object: route of each column (:data:`ROUTES` or ``dropped``)."""
    names: pd.Index
    """The names as given (var_names, or the gene_key column)."""
    report: GeneIdReport

    def set_expressed(self, expressed: np.ndarray) -> None:
        """Record which genes have counts and the fraction of them resolved through a table."""
        expressed = np.asarray(expressed, dtype=bool)
        self.report.n_expressed = int(expressed.sum())
        table_routed = ~np.isin(self.routes, ["unresolved", "dropped"])
        self.report.resolved_fraction = float(table_routed[expressed].mean()) if expressed.any() else 0.0


def _candidate_names(var: pd.DataFrame, var_names: pd.Index, gene_key: str | None, source: str) -> list[pd.Series]:
    """Identifier columns, names as given first (stripped strings, positional index)."""
    if gene_key is not None:
        if gene_key not in var.columns:
            raise InputError(f"{source}: gene_key={gene_key!r} is not a var column; available: {list(var.columns)}.")
        columns = [var[gene_key]]
    else:
        columns = [pd.Series(var_names, dtype=object)] + [var[c] for c in IDENTIFIER_COLUMNS if c in var.columns]
    return [pd.Series(np.asarray(c, dtype=str), dtype=object).str.strip() for c in columns]


def _identifiers_only(names: pd.Series) -> pd.Series:
    """Blank out names that identify nothing: empty, NaN-like, or row numbers."""
    bad = names.str.lower().isin(_NOT_NAMES) | names.str.fullmatch(r"\d+")
    return names.where(~bad, "")


def _lookup(lookup: pd.Series, names: pd.Series) -> np.ndarray:
    """Key per name (object array, None where absent)."""
    if lookup.empty:
        return np.full(len(names), None, dtype=object)
    pos = lookup.index.get_indexer(names)  # identifiers are unique by construction
    out = np.full(len(names), None, dtype=object)
    hit = pos >= 0
    out[hit] = lookup.to_numpy()[pos[hit]]
    return out


def _route_hits(tables: tuple[GeneTable, ...], names: pd.Series) -> dict[str, np.ndarray]:
    """Per route, the key each name resolves to (None if not), over all tables in priority order."""
    found = names.str.extract(ENSEMBL_PATTERN)
    stem, versioned = found[0].fillna(""), found[1].notna().to_numpy()
    upper = names.str.upper()
    hits = {}
    for route, query, lookup in (
        ("ensembl", stem, "ensembl"), ("symbol", names, "symbol"), ("alias", names, "alias"),
        ("uppercase", upper, "symbol_upper"), ("uppercase_alias", upper, "alias_upper"),
    ):
        out = np.full(len(names), None, dtype=object)
        for table in tables:
            hit = _lookup(table.lookups[lookup], query)
            fill = (out == None) & (hit != None)  # noqa: E711 (elementwise on object arrays)
            out[fill] = hit[fill]
        hits[route] = out
    hits["ensembl_versioned"] = np.where(versioned, hits["ensembl"], None)
    hits["ensembl"] = np.where(versioned, None, hits["ensembl"])
    return hits


def _fallback_key(names: pd.Series) -> pd.Series:
    """The name as given, without an Ensembl version suffix ('' stays '': not an identifier)."""
    return names.str.replace(r"^(ENS[A-Z]*G\d{11})\.\d+$", r"\1", regex=True)


def _species(names: pd.Series, routes: np.ndarray) -> str:
    prefixes = names.str.extract(r"^(ENS[A-Z]*G)\d{11}")[0].dropna()
    if len(prefixes) > len(names) / 2:
        prefix = Counter(prefixes).most_common(1)[0][0]
        return ENSEMBL_SPECIES.get(prefix, prefix)
    counts = Counter(routes)
    exact = counts["ensembl"] + counts["ensembl_versioned"] + counts["symbol"] + counts["alias"]
    if counts["uppercase"] > exact:
        return "non-human (symbols matched upper-cased)"
    return "human" if exact else "unknown"


def resolve_names(columns: list[pd.Series], tables: tuple[GeneTable, ...], *, source: str = "data") -> GeneResolution:
    """Resolve genes given one or more identifier columns each (first column = the names as given)."""
    given = columns[0]
    columns = [_identifiers_only(col) for col in columns]
    n = len(given)
    keys = np.full(n, None, dtype=object)
    routes = np.full(n, "unresolved", dtype=object)
    ambiguous = np.zeros(n, dtype=bool)
    all_hits = [_route_hits(tables, col) for col in columns]
    route_order = ("ensembl", "ensembl_versioned", "symbol", "alias", "uppercase", "uppercase_alias")
    for route in route_order:  # route-major: an Ensembl hit in any column beats a symbol hit
        for hits in all_hits:
            fill = (keys == None) & (hits[route] != None)  # noqa: E711
            keys[fill] = hits[route][fill]
            routes[fill] = "uppercase" if route == "uppercase_alias" else route
    ambiguous_names = frozenset().union(*(t.ambiguous_aliases for t in tables))
    unresolved = keys == None  # noqa: E711
    for col in columns:
        ambiguous |= unresolved & (col.isin(ambiguous_names) | col.str.upper().isin(ambiguous_names)).to_numpy()
        fallback = _fallback_key(col).to_numpy(dtype=object)
        fill = (keys == None) & (fallback != "")  # noqa: E711
        keys[fill] = fallback[fill]
    names = pd.Index(given)
    not_ids = keys == None  # noqa: E711
    routes[not_ids] = "dropped"
    duplicate = _duplicate_keys(keys, routes)
    counts = Counter(routes)
    report = GeneIdReport(
        source=source,
        n_genes=n,
        routes={route: counts.get(route, 0) for route in (*ROUTES, "dropped")},
        species=_species(columns[0], routes),
        ambiguous=list(names[ambiguous][:_LIST_LIMIT]),
        merged=list(names[duplicate][:_LIST_LIMIT]),
        n_merged=int(duplicate.sum()),
        not_identifiers=list(names[not_ids][:_LIST_LIMIT]),
    )
    return GeneResolution(keys=keys, routes=routes, names=names, report=report)


def _duplicate_keys(keys: np.ndarray, routes: np.ndarray) -> np.ndarray:
    """Columns whose key a better-routed (then earlier) column already has."""
    has_key = keys != None  # noqa: E711
    rank = {route: i for i, route in enumerate((*ROUTES, "dropped"))}
    frame = pd.DataFrame({"key": keys[has_key], "rank": [rank[r] for r in routes[has_key]]},
                         index=np.flatnonzero(has_key))
    best_first = frame.sort_values(["rank"], kind="stable")
    duplicate = np.zeros(len(keys), dtype=bool)
    duplicate[best_first.index[best_first.key.duplicated()]] = True
    return duplicate


def resolve_gene_ids(
    var: pd.DataFrame,
    *,
    gene_key: str | None = None,
    gene_table: str | os.PathLike | None = None,
    source: str = "data",
) -> GeneResolution:
    """Resolve the genes of a file (its ``adata.var``) to canonical vocabulary keys.

    Parameters
    ----------
    var
        ``adata.var``; its index holds the var names.
    gene_key
        Use only this var column (instead of var_names and the usual identifier columns).
    gene_table
        A TSV with another species' IDs or an ortholog mapping, consulted before the human table
        (format in :func:`load_gene_table`). Without one, non-human symbols match human genes upper-cased.
    source
        File name used in the report and in errors.

    Returns
    -------
    :class:`GeneResolution` with one key per column (None where dropped) and a :class:`GeneIdReport`.
    """
    columns = _candidate_names(var, pd.Index(var.index), gene_key, source)
    _require_unique(columns[0], source)
    return resolve_names(columns, gene_tables(gene_table), source=source)


def raw_gene_ids(var: pd.DataFrame, *, gene_key: str | None = None, source: str = "data") -> GeneResolution:
    """Keys = the names as given (``gene_id_mode="raw"``); duplicate names are an error."""
    if gene_key is not None and gene_key not in var.columns:
        raise InputError(f"{source}: gene_key={gene_key!r} is not a var column; available: {list(var.columns)}.")
    names = pd.Series(pd.Index(var.index if gene_key is None else var[gene_key]).astype(str), dtype=object)
    _require_unique(names, source)
    report = GeneIdReport(source=source, n_genes=len(names), routes={"raw": len(names)})
    return GeneResolution(keys=names.to_numpy(dtype=object), routes=np.full(len(names), "raw", dtype=object),
                          names=pd.Index(names), report=report)


def _require_unique(names: pd.Series, source: str) -> None:
    """The same name twice is ambiguous (which column is the gene?): an error, unlike two names of one gene."""
    if pd.Index(names).is_unique:
        return
    duplicated = names[names.duplicated() & (names != "")]
    if len(duplicated):
        raise InputError(
            f"{source}: {len(duplicated)} duplicate gene names (e.g. {list(duplicated.unique()[:3])}). "
            "Make them unique (adata.var_names_make_unique()) or aggregate duplicates before tokenizing."
        )


def require_identifiers(resolution: GeneResolution, source: str) -> None:
    """Raise :class:`InputError` when no column of a file has a usable gene identifier."""
    if (resolution.keys != None).any():  # noqa: E711
        return
    examples = ", ".join(repr(n) for n in resolution.names[:3])
    raise InputError(
        f"{source}: no overlap with any gene vocabulary: none of its {len(resolution.names)} genes has a usable "
        f"identifier (var names {examples}, ...). The gene names were lost (row numbers instead of symbols "
        "or Ensembl IDs); restore them in var_names, or name the var column that holds them with gene_key."
    )
