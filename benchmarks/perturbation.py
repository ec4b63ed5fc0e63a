"""In-silico perturbation with the shipped model on interferon-stimulated PBMCs (kang_pbmc_ctrl_stim), against
random gene sets of matched expression, and the attention-weights path against the fused forward.

(a) Over-expression: in control cells, over-express the 20 genes most up in stimulated cells (Wilcoxon on
    log-normalised counts, stim vs ctrl, adjusted p < 0.05, expressed in >= 20% of stimulated cells, ranked by
    log2 fold change). Statistic: the mean over cells of ``target_shift`` (cosine to the stimulated cells' centroid,
    after minus before). Null: random gene sets of the same size, each gene drawn from the same decile of mean
    expression in the control cells as the gene it stands for (from all other genes, ISGs included: conservative).
(b) Deletion: for each cell type, delete its 10 top markers (Wilcoxon, that type vs the other control cells) in
    the cells of that type. Statistic: the mean over the type's cells of ``target_shift`` to the type's own centroid
    (0 for a cell holding none of the genes). Null: random sets matched by expression decile within the type.
p-values are one-sided permutation p-values, (1 + null sets at least as extreme) / (1 + null sets); effect size is
(statistic - null mean) / null standard deviation. Both are repeated on an untrained model of the same
architecture (random weights, seed 0), as a control of how much of an effect the tokens alone produce.

Inputs are restricted to the genes the model saw in pretraining (kang_pbmc_8donors' 1,287 genes): its other
vocabulary genes were never trained. Cell types of the control cells come from kang_pbmc_8donors, which holds 954
of them with identical counts (matched by barcode and checked count by count); kang_pbmc_ctrl_stim has no labels.

    python benchmarks/perturbation.py [--n-cells 150] [--n-null 100] [--n-null-markers 40]

Writes benchmarks/results/perturbation.md and .json; prints the summary as one JSON object on its last line.
One thread; about 10 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import torch

from atlasformer.analysis.perturb import perturb_genes, rank_genes_by_effect
from atlasformer.checkpoints import load_model_folder, resolve_model
from atlasformer.finetune.common import model_batch, model_gene_keys, tokenize_for_model
from atlasformer.model_zoo import CellTransformerForPretraining

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MODEL = "atlasformer-public-small"


# ------------------------------------------------------------------------------------------ data
def load_inputs(data_path: Path, corpus_path: Path, tokenizer) -> ad.AnnData:
    """The ctrl / stim cells on the genes seen in pretraining, with ``obs['cell_type']`` for the control cells that
    the pretraining corpus holds with identical counts (others: NaN)."""
    adata = ad.read_h5ad(data_path)
    corpus = ad.read_h5ad(corpus_path)
    keys = model_gene_keys(adata, tokenizer)
    corpus_genes = set(corpus.var_names)
    seen = np.asarray([k is not None and k in corpus_genes for k in keys])
    adata = adata[:, seen].copy()
    adata.var["model_key"] = np.asarray(keys, dtype=object)[seen]
    # the same cell has the same counts in both files, gene by gene (genes matched by symbol, as both files name them)
    corpus_column = {}
    for j, symbol in enumerate(corpus.var["gene_symbol"].astype(str)):
        corpus_column.setdefault(symbol, j)
    shared = [g for g in adata.var_names if g in corpus_column]
    ours, theirs = adata.var_names.get_indexer(shared), np.asarray([corpus_column[g] for g in shared])
    corpus_rows = {name.split("-")[0]: i for i, name in enumerate(corpus.obs_names)}
    labels = np.full(adata.n_obs, None, dtype=object)
    for i, name in enumerate(adata.obs_names):
        j = corpus_rows.get(name.split("-")[0])
        if adata.obs["condition"].iloc[i] == "ctrl" and j is not None:
            if np.array_equal(adata.X[i].toarray().ravel()[ours], corpus.X[j].toarray().ravel()[theirs]):
                labels[i] = corpus.obs["cell_type"].iloc[j]
    adata.obs["cell_type"] = pd.Categorical(labels)
    return adata


def log_normalised(adata: ad.AnnData) -> ad.AnnData:
    out = adata.copy()
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    return out


def top_up_genes(lognorm: ad.AnnData, groupby: str, group: str, reference: str, n: int, min_fraction: float) -> pd.DataFrame:
    """The ``n`` genes most up in ``group`` (Wilcoxon vs ``reference``, adjusted p < 0.05, expressed in at least
    ``min_fraction`` of the group), by log2 fold change."""
    sc.tl.rank_genes_groups(lognorm, groupby, groups=[group], reference=reference, method="wilcoxon", pts=True)
    table = sc.get.rank_genes_groups_df(lognorm, group=group)
    table = table[(table["pvals_adj"] < 0.05) & (table["logfoldchanges"] > 0) & (table["pct_nz_group"] >= min_fraction)]
    return table.sort_values("logfoldchanges", ascending=False).head(n).reset_index(drop=True)


def matched_random_sets(genes: list[str], mean_expression: pd.Series, n_sets: int, rng: np.random.Generator) -> dict:
    """``n_sets`` random sets, each gene of ``genes`` replaced by a random other gene of the same expression decile
    (distinct genes within a set)."""
    decile = pd.qcut(mean_expression.rank(method="first"), 10, labels=False)
    pools = {d: np.setdiff1d(mean_expression.index[decile == d], genes) for d in range(10)}
    needed = pd.Series(decile[genes].to_numpy()).value_counts().sort_index()
    return {f"random_{i}": [str(g) for d, n in needed.items() for g in rng.choice(pools[d], n, replace=False)]
            for i in range(n_sets)}


def permutation_stats(observed: float, null: np.ndarray, greater: bool) -> dict:
    extreme = (null >= observed) if greater else (null <= observed)
    sd = float(null.std(ddof=1))
    return {"statistic": observed, "null_mean": float(null.mean()), "null_sd": sd,
            "effect_size": (observed - float(null.mean())) / sd if sd > 0 else float("nan"),
            "p_value": (1 + int(extreme.sum())) / (1 + len(null)), "n_null": len(null)}


# ------------------------------------------------------------------------------------------ experiments
def overexpression_experiment(adata, model, isgs: list[str], null_sets: dict, batch_size: int) -> dict:
    results = perturb_genes(adata, model, {"ISG": isgs, **null_sets}, mode="overexpress", cells="condition=ctrl",
                            target="condition=stim", batch_size=batch_size)
    per_set = results.groupby("perturbation", observed=True)["target_shift"].mean()
    stats = permutation_stats(float(per_set["ISG"]), per_set.drop("ISG").to_numpy(), greater=True)
    isg_rows = results[results["perturbation"] == "ISG"]
    stats.update(fraction_cells_toward=float((isg_rows["target_shift"] > 0).mean()),
                 cosine_shift_isg=float(isg_rows["cosine_shift"].mean()),
                 cosine_shift_null_mean=float(results[results["perturbation"] != "ISG"]["cosine_shift"].mean()),
                 n_cells=int(len(isg_rows)), genes_x_cells_per_s=results.attrs["genes_x_cells_per_s"],
                 n_copies=results.attrs["n_copies"])
    return stats


def deletion_experiment(adata, model, markers: dict, n_null: int, lognorm, batch_size: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, 2])
    out = {}
    for cell_type, genes in markers.items():
        in_type = (adata.obs["cell_type"] == cell_type).to_numpy()
        mean_expression = pd.Series(np.asarray(lognorm[in_type].X.mean(0)).ravel(), index=lognorm.var_names)
        sets = {"markers": genes, **matched_random_sets(genes, mean_expression, n_null, rng)}
        results = perturb_genes(adata, model, sets, mode="delete", cells=f"cell_type={cell_type}",
                                target=f"cell_type={cell_type}", batch_size=batch_size)
        # a cell holding none of a set's genes is unchanged: it counts as 0 in the mean over the type's cells
        per_set = results.groupby("perturbation", observed=True)["target_shift"].sum() / int(in_type.sum())
        per_set = per_set.reindex(list(sets), fill_value=0.0)
        stats = permutation_stats(float(per_set["markers"]), per_set.drop("markers").to_numpy(), greater=False)
        stats.update(n_cells=int(in_type.sum()), markers=genes, genes_x_cells_per_s=results.attrs["genes_x_cells_per_s"],
                     n_copies=results.attrs["n_copies"])
        out[cell_type] = stats
    return out


@torch.no_grad()
def attention_equivalence(model, tokenizer, adata, n_cells: int = 64, batch_size: int = 16) -> dict:
    """Max |difference| between the fused (SDPA) forward and the output_attentions forward on real cells (padded
    batches), and how far the weights' rows are from summing to 1 and padded keys from 0."""
    cells = tokenize_for_model(adata[:n_cells], tokenizer).cells
    backbone = model.backbone.eval()
    hidden, embedding, row_sum, pad_weight = 0.0, 0.0, 0.0, 0.0
    for lo in range(0, len(cells), batch_size):
        batch = model_batch(cells, np.arange(lo, min(lo + batch_size, len(cells))), tokenizer)
        fused = backbone(**batch)
        explicit = backbone(**batch, output_attentions=True)
        real = batch["attention_mask"]
        hidden = max(hidden, float((fused.hidden_states - explicit.hidden_states)[real].abs().max()))
        embedding = max(embedding, float((fused.cell_embedding - explicit.cell_embedding).abs().max()))
        for weights in explicit.attentions:  # (batch, heads, seq, seq)
            row_sum = max(row_sum, float((weights.sum(-1) - 1).abs().max()))
            on_padding = weights.masked_select(~real[:, None, None, :])
            pad_weight = max(pad_weight, float(on_padding.abs().max()) if on_padding.numel() else 0.0)
    return {"n_cells": len(cells), "max_abs_diff_hidden_states": hidden, "max_abs_diff_cell_embedding": embedding,
            "max_row_sum_error": row_sum, "max_weight_on_padding": pad_weight}


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(SHARED / "kang_pbmc_ctrl_stim.h5ad"))
    parser.add_argument("--corpus", default=str(SHARED / "kang_pbmc_8donors.h5ad"),
                        help="the shipped model's pretraining corpus: its genes and the control cells' labels")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--n-cells", type=int, default=150, help="control cells perturbed (and stimulated cells for the centroid)")
    parser.add_argument("--n-isg", type=int, default=20)
    parser.add_argument("--n-markers", type=int, default=10)
    parser.add_argument("--min-type-cells", type=int, default=15, help="cell types with fewer sampled cells are skipped")
    parser.add_argument("--n-null", type=int, default=100, help="random gene sets for (a)")
    parser.add_argument("--n-null-markers", type=int, default=40, help="random gene sets per cell type for (b)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-untrained", action="store_true", help="leave out the random-weights control")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "perturbation"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)

    model, tokenizer = load_model_folder(resolve_model(args.model))
    model.eval()
    full = load_inputs(Path(args.data), Path(args.corpus), tokenizer)
    lognorm_full = log_normalised(full)
    isg_table = top_up_genes(lognorm_full.copy(), "condition", "stim", "ctrl", args.n_isg, 0.2)
    isgs = isg_table["names"].tolist()

    ctrl = np.flatnonzero((full.obs["condition"] == "ctrl").to_numpy() & full.obs["cell_type"].notna().to_numpy())
    stim = np.flatnonzero((full.obs["condition"] == "stim").to_numpy())
    sample = np.sort(np.concatenate([rng.choice(ctrl, args.n_cells, replace=False),
                                     rng.choice(stim, args.n_cells, replace=False)]))
    adata = full[sample].copy()
    lognorm = lognorm_full[sample].copy()
    ctrl_mean = pd.Series(np.asarray(lognorm[adata.obs["condition"] == "ctrl"].X.mean(0)).ravel(), index=adata.var_names)
    isg_null = matched_random_sets(isgs, ctrl_mean, args.n_null, np.random.default_rng([args.seed, 1]))

    counts = adata.obs.loc[adata.obs["condition"] == "ctrl", "cell_type"].value_counts()
    types = [t for t, n in counts.items() if n >= args.min_type_cells]
    labelled = lognorm_full[lognorm_full.obs["cell_type"].notna()].copy()
    labelled.obs["cell_type"] = labelled.obs["cell_type"].astype(str)
    markers = {}
    for cell_type in types:
        table = top_up_genes(labelled.copy(), "cell_type", cell_type, "rest", args.n_markers, 0.2)
        markers[cell_type] = table["names"].tolist()
    ctrl_only = adata[adata.obs["condition"] == "ctrl"].copy()
    ctrl_lognorm = lognorm[adata.obs["condition"] == "ctrl"].copy()

    models = {"pretrained": (model, tokenizer)}
    if not args.skip_untrained:
        torch.manual_seed(0)
        models["untrained"] = (CellTransformerForPretraining(model.config).eval(), tokenizer)
    results = {}
    for name, pair in models.items():
        t0 = time.perf_counter()
        up = overexpression_experiment(adata, pair, isgs, isg_null, args.batch_size)
        down = deletion_experiment(ctrl_only, pair, markers, args.n_null_markers, ctrl_lognorm, args.batch_size, args.seed)
        results[name] = {"overexpress_isg": up, "delete_markers": down, "seconds": time.perf_counter() - t0}
        print(f"{name}: ISG p={up['p_value']:.3g} effect={up['effect_size']:.2f}; "
              + "; ".join(f"{t} p={s['p_value']:.3g}" for t, s in down.items()), file=sys.stderr)
    single = rank_genes_by_effect(perturb_genes(adata, models["pretrained"], isgs, mode="overexpress",
                                                cells="condition=ctrl", target="condition=stim",
                                                batch_size=args.batch_size))
    attention = attention_equivalence(model, tokenizer, adata)
    seconds = time.perf_counter() - started

    pre = results["pretrained"]
    summary = {
        "isg_overexpress_effect_size": round(pre["overexpress_isg"]["effect_size"], 3),
        "isg_overexpress_p": round(pre["overexpress_isg"]["p_value"], 4),
        "isg_overexpress_target_shift": pre["overexpress_isg"]["statistic"],
        "marker_delete_effect_size": {t: round(s["effect_size"], 3) for t, s in pre["delete_markers"].items()},
        "marker_delete_p": {t: round(s["p_value"], 4) for t, s in pre["delete_markers"].items()},
        "marker_delete_types_p_below_0.05": sum(s["p_value"] < 0.05 for s in pre["delete_markers"].values()),
        "genes_x_cells_per_s": round(pre["overexpress_isg"]["genes_x_cells_per_s"], 1),
        "attention_max_abs_diff": max(attention["max_abs_diff_hidden_states"], attention["max_abs_diff_cell_embedding"]),
        "seconds": round(seconds, 1),
    }
    if "untrained" in results:
        summary["untrained_isg_overexpress_effect_size"] = round(results["untrained"]["overexpress_isg"]["effect_size"], 3)
        summary["untrained_isg_overexpress_p"] = round(results["untrained"]["overexpress_isg"]["p_value"], 4)
        summary["untrained_marker_delete_types_p_below_0.05"] = sum(
            s["p_value"] < 0.05 for s in results["untrained"]["delete_markers"].values())
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.node()}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                         "1 thread; other jobs shared the cores, so times are indicative",
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix().split("/main/")[-1], *sys.argv[1:]]),
              "settings": {k: v for k, v in vars(args).items() if k not in ("data", "corpus", "output")},
              "data": {"file": Path(args.data).name, "genes_seen_in_pretraining": int(full.n_vars),
                       "control_cells_labelled": int(full.obs["cell_type"].notna().sum()),
                       "cells_perturbed": int(args.n_cells), "cell_types": {t: int(counts[t]) for t in types}},
              "isgs": isg_table[["names", "logfoldchanges", "pvals_adj", "pct_nz_group"]]
              .round(4).to_dict("records"),
              "markers": markers, "results": results,
              "single_isg_ranking": single.round(6).to_dict("records"), "attention_equivalence": attention,
              "summary": summary}
    write_results(Path(args.output), record)
    print(json.dumps(summary, default=float))


def write_results(output: Path, record: dict) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(record, indent=2, default=float))
    s, results = record["summary"], record["results"]
    lines = ["# In-silico perturbation on interferon-stimulated PBMCs", "",
             f"{record['date']}, {record['machine']}.", "", f"Command: `{record['command']}`", "",
             f"{record['data']['file']} restricted to the {record['data']['genes_seen_in_pretraining']} genes the shipped "
             f"model saw in pretraining; {record['data']['cells_perturbed']} control cells perturbed, the same number of "
             "stimulated cells give the target centroid. Method, statistics and their caveats: the docstring of "
             "`benchmarks/perturbation.py`.", "",
             "## (a) Over-expressing the 20 most interferon-induced genes in control cells", "",
             "ISGs (log2 fold change stim vs ctrl): " + ", ".join(f"{r['names']} ({r['logfoldchanges']:.1f})"
                                                                  for r in record["isgs"]), "",
             "| model | mean target_shift, ISGs | null mean (sd) | effect size | p | cells moved toward | "
             "cosine_shift ISGs / null |", "|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        a = result["overexpress_isg"]
        lines.append(f"| {name} | {a['statistic']:.5f} | {a['null_mean']:.5f} ({a['null_sd']:.5f}) | "
                     f"{a['effect_size']:.2f} | {a['p_value']:.4f} (n_null {a['n_null']}) | "
                     f"{a['fraction_cells_toward']:.2f} | {a['cosine_shift_isg']:.5f} / {a['cosine_shift_null_mean']:.5f} |")
    lines.append("")
    for name, result in results.items():
        a = result["overexpress_isg"]
        beaten = round(a["p_value"] * (a["n_null"] + 1) - 1)
        lines.append(f"- {name}: the ISG set moved control cells toward the stimulated centroid more than "
                     f"{a['n_null'] - beaten} of {a['n_null']} matched random sets (p = {a['p_value']:.4f}).")
    lines += ["", "## (b) Deleting a cell type's 10 top markers in cells of that type", "",
              "| model | cell type | cells | mean target_shift to own centroid | null mean (sd) | effect size | p |",
              "|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        for cell_type, b in result["delete_markers"].items():
            lines.append(f"| {name} | {cell_type} | {b['n_cells']} | {b['statistic']:.6f} | {b['null_mean']:.6f} "
                         f"({b['null_sd']:.6f}) | {b['effect_size']:.2f} | {b['p_value']:.4f} |")
    lines.append("")
    for name, result in results.items():
        significant = [t for t, b in result["delete_markers"].items() if b["p_value"] < 0.05]
        lines.append(f"- {name}: markers moved cells away from their type's centroid more than matched random sets "
                     f"(p < 0.05) in {len(significant)} of {len(result['delete_markers'])} types"
                     f"{': ' + ', '.join(significant) if significant else ''}.")
    lines += ["", "Markers: " + "; ".join(f"{t}: {', '.join(g)}" for t, g in record["markers"].items()), "",
              "## Single ISGs (pretrained model), ranked by mean target_shift", "",
              "| gene | cells | target_shift | fraction toward | cosine_shift | expression_shift |", "|---|---|---|---|---|---|"]
    for r in record["single_isg_ranking"]:
        lines.append(f"| {r['perturbation']} | {r['n_cells']} | {r['target_shift']:.5f} | {r['fraction_toward']:.2f} | "
                     f"{r['cosine_shift']:.5f} | {r['expression_shift']:.4f} |")
    att = record["attention_equivalence"]
    lines += ["", "## Throughput and the attention-weights path", "",
              f"- Perturbation throughput (pretrained, (a), batch {record['settings']['batch_size']}, 1 thread): "
              f"{s['genes_x_cells_per_s']} genes x cells per s (copies built, embedded and scored).",
              f"- output_attentions vs the fused SDPA forward on {att['n_cells']} real cells in padded batches: max |diff| "
              f"hidden states {att['max_abs_diff_hidden_states']:.2e}, cell embedding {att['max_abs_diff_cell_embedding']:.2e}; "
              f"rows sum to 1 within {att['max_row_sum_error']:.1e}; largest weight on a padded key {att['max_weight_on_padding']}.",
              f"- Whole run: {s['seconds']} s.", ""]
    output.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
