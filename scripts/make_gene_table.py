"""Derive the human gene table shipped as package data from org.Hs.eg.db's export.

Input: ``human_genes.tsv`` (Bioconductor org.Hs.eg.db 3.16.0, Artistic-2.0) with columns
``ensembl_id, symbol, entrez_id, gene_type, name, aliases`` and one row per (Entrez gene, Ensembl ID)
pair. Output: ``tokenization/data/human_genes.tsv.gz`` with one row per Entrez gene and the columns
the resolver reads (see docs/tokenization.md, "Gene identifiers"):

- ``ensembl_id``: the Ensembl IDs the gene owns, '|'-joined, canonical one first (empty if none);
- ``symbol``: the official (HGNC) symbol;
- ``aliases``: other names, '|'-joined, without the symbol;
- ``entrez_id``, ``gene_type``: kept for provenance and filtering.

Ownership rule: org.Hs.eg.db links some Ensembl IDs to several Entrez genes (mostly readthrough
transcripts and antisense genes sharing the ID of the gene they overlap). Such an ID is owned by the
linked gene with the smallest Entrez ID (the longer-established gene). A gene's canonical key is the
smallest Ensembl ID it owns; a gene owning none is keyed by its symbol.

Usage::

    python scripts/make_gene_table.py /work/shared/data/genes/human_genes.tsv tokenization/data/human_genes.tsv.gz
"""

from __future__ import annotations

import argparse
import gzip
import os
from pathlib import Path

import pandas as pd

COLUMNS = ["ensembl_id", "symbol", "aliases", "entrez_id", "gene_type"]


def read_source(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = {"ensembl_id", "symbol", "entrez_id", "gene_type", "aliases"} - set(table.columns)
    if missing:
        raise SystemExit(f"{path}: missing columns {sorted(missing)}")
    return table


def owned_ensembl_ids(table: pd.DataFrame) -> pd.Series:
    """Entrez ID -> sorted list of the Ensembl IDs it owns (the smallest Entrez ID linked to an ID owns it)."""
    links = table.loc[table.ensembl_id != "", ["ensembl_id", "entrez_id"]].drop_duplicates()
    links = links.assign(entrez_num=links.entrez_id.astype(int)).sort_values(["ensembl_id", "entrez_num"])
    owners = links.drop_duplicates("ensembl_id", keep="first")
    return owners.groupby("entrez_id").ensembl_id.apply(sorted)


def gene_rows(table: pd.DataFrame) -> pd.DataFrame:
    """One row per Entrez gene, in Entrez order, with owned Ensembl IDs and aliases without the symbol."""
    genes = table.drop_duplicates("entrez_id").copy()
    genes["entrez_num"] = genes.entrez_id.astype(int)
    genes = genes.sort_values("entrez_num")
    owned = owned_ensembl_ids(table)
    genes["ensembl_id"] = genes.entrez_id.map(owned).map(lambda ids: "|".join(ids) if isinstance(ids, list) else "")
    genes["aliases"] = [
        "|".join(dict.fromkeys(a for a in aliases.split("|") if a and a != symbol))
        for aliases, symbol in zip(genes.aliases, genes.symbol)
    ]
    return genes[COLUMNS]


def write_table(genes: pd.DataFrame, out: Path) -> None:
    """Write gzipped TSV atomically, with a fixed gzip mtime so reruns give identical bytes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        gz.write(genes.to_csv(sep="\t", index=False, lineterminator="\n").encode())
    os.replace(tmp, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="human_genes.tsv exported from org.Hs.eg.db")
    parser.add_argument("output", type=Path, help="output .tsv.gz (tokenization/data/human_genes.tsv.gz)")
    args = parser.parse_args()
    table = read_source(args.source)
    genes = gene_rows(table)
    write_table(genes, args.output)
    n_keyed = int((genes.ensembl_id != "").sum())
    print(f"{args.output}: {len(genes)} genes ({n_keyed} with an Ensembl ID), {args.output.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
