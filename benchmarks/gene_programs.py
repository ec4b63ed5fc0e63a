"""What the shipped model knows about genes (issue 17): gene embeddings, gene programs, and known gene sets.

On ``atlasformer-public-small`` (or ``--model``):

1. input gene embeddings of the whole vocabulary, and context-aware ones (mean output hidden state over up to
   ``--max-cells`` cells of ``--data``);
2. which genes the model saw in pretraining: from its corpus files (``--corpus-dir`` holding the files its
   manifest names; tokenized and split as pretraining did) and from the weights alone, and how the two agree;
   with ``--optimizer-state`` (a training checkpoint's ``optimizer.pt`` of the same recipe) also against the rows
   AdamW holds gradient statistics for;
3. gene programs (Leiden on the cosine kNN graph of the seen genes), scored on ``--data`` per cell type;
4. cohesion of known gene sets (ribosomal, mitochondrial, HLA class II, PBMC markers, and a random control)
   against frequency-matched random sets, for the input and the context-aware embedding, centred (the
   default) and raw, matched and unmatched.

    OMP_NUM_THREADS=1 python benchmarks/gene_programs.py [--data ../shared/data/pbmc4k_10x_v2.h5ad]

Writes ``benchmarks/results/gene_programs.md`` and ``.json``; prints one JSON object last. One thread, a few
minutes.
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

import numpy as np
import pandas as pd
import torch

from atlasformer.analysis import genes as G
from atlasformer.checkpoints import load_weights_only, read_manifest, resolve_model
from atlasformer.tokenization import read_h5ad

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
ALPHA = 0.01


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"platform": platform.platform(), "cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "load_average_start": os.getloadavg()[0]}


def corpus_files(model: str, corpus_dir: Path) -> list[Path] | None:
    """The model's pretraining files (its manifest's run_config['data']) found in ``corpus_dir``, or None."""
    names = read_manifest(resolve_model(model), verify=False).get("run_config", {}).get("data", [])
    files = [corpus_dir / Path(name).name for name in names]
    return files if files and all(f.exists() for f in files) else None


def seen_agreement(ge, corpus_seen: np.ndarray | None, optimizer_state: str | None, model: str) -> dict:
    """How the weights-only derivation (and, given, the optimizer's record) agree with the corpus derivation."""
    run_config = read_manifest(resolve_model(model), verify=False).get("run_config", {})
    weights_seen = G.trained_rows_from_weights(np.asarray(ge.X), run_config)
    out: dict = {"n_vocabulary_genes": int(ge.n_obs)}
    if weights_seen is not None:
        out["n_seen_weights"] = int(weights_seen.sum())
    if corpus_seen is not None:
        out["n_seen_corpus"] = int(corpus_seen.sum())
        if weights_seen is not None:
            out.update(weights_vs_corpus_agreement=float((weights_seen == corpus_seen).mean()),
                       seen_by_corpus_only=int((corpus_seen & ~weights_seen).sum()),
                       seen_by_weights_only=int((weights_seen & ~corpus_seen).sum()))
    if optimizer_state and corpus_seen is not None:
        state = load_weights_only(optimizer_state, map_location="cpu")["state"]
        n_tokens = int(ge.obs["token_id"].max()) + 1  # special tokens come first in an atlasformer vocabulary
        table = next(v["exp_avg_sq"] for v in state.values() if tuple(v["exp_avg_sq"].shape) == (n_tokens, ge.n_vars))
        touched = (table.numpy() > 0).any(1)[ge.obs["token_id"].to_numpy()]
        out.update(optimizer_state=optimizer_state, n_rows_with_gradient=int(touched.sum()),
                   corpus_vs_optimizer_agreement=float((touched == corpus_seen).mean()),
                   corpus_vs_optimizer_mismatches=int((touched != corpus_seen).sum()))
    return out


def enrichment_runs(ge, sets: dict, n_permutations: int, seed: int) -> dict[str, pd.DataFrame]:
    """Every variant of the cohesion test: representation x centring x frequency matching."""
    variants = {
        "input, centred, matched": dict(use_rep=None, center=True, match_on="auto"),
        "input, raw cosine, matched": dict(use_rep=None, center=False, match_on="auto"),
        "input, centred, unmatched": dict(use_rep=None, center=True, match_on=None),
    }
    if G.CONTEXT_LAYER in ge.layers:
        variants.update({
            "context, centred, matched": dict(use_rep="context", center=True, match_on="auto",
                                              program_key="context_program"),
            "context, raw cosine, matched": dict(use_rep="context", center=False, match_on="auto",
                                                 program_key="context_program"),
        })
    return {name: G.gene_set_enrichment(ge, sets, n_permutations=n_permutations, seed=seed, **kw)
            for name, kw in variants.items()}


def program_scores_by_cell_type(data_path: str, programs: pd.DataFrame, labels_key: str, max_programs: int) -> dict:
    """Score the largest programs on the data; per program the cell type with the highest mean score."""
    adata = read_h5ad(data_path, backed=False)
    if labels_key not in adata.obs:
        return {}
    names = G.score_programs(adata, programs.iloc[:max_programs])
    means = adata.obs.groupby(labels_key, observed=True)[names].mean()
    out = {}
    for name in names:
        ranked = means[name].sort_values(ascending=False)
        out[name] = {"top_cell_type": str(ranked.index[0]), "top_mean": float(ranked.iloc[0]),
                     "second_cell_type": str(ranked.index[1]), "second_mean": float(ranked.iloc[1])}
    return out


def sets_in_programs(table: pd.DataFrame) -> dict[str, str]:
    """Program -> the reference sets whose commonest program it is."""
    out: dict[str, list[str]] = {}
    for name, row in table.iterrows():
        if isinstance(row.get("program"), str) and row["program"] != "none" and np.isfinite(row["program_fraction"]):
            out.setdefault(row["program"], []).append(f"{name} ({row['program_fraction']:.0%})")
    return {k: ", ".join(v) for k, v in out.items()}


def fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def enrichment_markdown(table: pd.DataFrame) -> list[str]:
    has_programs = "program_fraction" in table
    head = "| set | genes | present | cohesion | null mean | null SD | effect (SD) | p | enriched |"
    head += " program | in it | null | p (program) |" if has_programs else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in table.iterrows():
        enriched = "yes" if np.isfinite(r["p_value"]) and r["p_value"] < ALPHA else ("n/a" if not np.isfinite(
            r["p_value"]) else "no")
        line = (f"| {name} | {r['n_genes']} | {r['n_present']} | {fmt(r['cohesion'])} | {fmt(r['null_mean'])} | "
                f"{fmt(r['null_sd'])} | {fmt(r['effect'], 2)} | {fmt(r['p_value'], 4)} | {enriched} |")
        if has_programs:
            line += (f" {r['program'] if isinstance(r['program'], str) else 'n/a'} | {fmt(r['program_fraction'], 2)} | "
                     f"{fmt(r['program_fraction_null'], 2)} | {fmt(r['program_p_value'], 4)} |")
        lines.append(line)
    return lines


def write_markdown(path: Path, result: dict, tables: dict[str, pd.DataFrame], programs: pd.DataFrame,
                   context_programs: pd.DataFrame | None) -> None:
    s, m = result["settings"], result["machine"]
    lines = [
        "# Gene embeddings, gene programs and known gene sets",
        "",
        f"Date: {result['date']}. Machine: {m['cpu']}, {m['nproc']} cores (shared with other jobs), {m['platform']}, "
        f"torch {m['torch']} on {m['threads']} thread. Wall time {result['wall_time_s']:.0f} s.",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Model `{s['model']}`; context-aware embedding on {s['n_cells']} cells of `{s['data']}` (seeded subset of "
        f"at most {s['max_cells']}); {s['n_permutations']} random sets per test, seed {s['seed']}; a set is called "
        f"enriched at p < {ALPHA}. The smallest possible p is 1 / ({s['n_permutations']} + 1).",
        "",
        "## Which genes the model saw in pretraining",
        "",
    ]
    seen = result["seen"]
    lines += [f"- vocabulary genes (special tokens left out): {seen['n_vocabulary_genes']:,}"]
    if "n_seen_corpus" in seen:
        lines += [f"- seen, from the corpus files (tokenized with the model's tokenizer, training cells of the "
                  f"pretraining split): {seen['n_seen_corpus']:,}"]
    if "n_seen_weights" in seen:
        lines += [f"- seen, from the weights alone (rows that left their N(0, 0.02^2) initialisation after weight "
                  f"decay, chi-square test at 1e-4): {seen['n_seen_weights']:,}"]
    if "weights_vs_corpus_agreement" in seen:
        lines += [f"- weights vs corpus: agree on {seen['weights_vs_corpus_agreement']:.4%} of genes "
                  f"({seen['seen_by_corpus_only']} seen by the corpus only, {seen['seen_by_weights_only']} by the "
                  "weights only)"]
    if "corpus_vs_optimizer_agreement" in seen:
        lines += [f"- corpus vs the optimizer state `{seen['optimizer_state']}` (rows with AdamW gradient "
                  f"statistics, {seen['n_rows_with_gradient']:,}): agree on {seen['corpus_vs_optimizer_agreement']:.4%}"
                  f" ({seen['corpus_vs_optimizer_mismatches']} mismatches). That run rebuilt the shipped recipe "
                  "(same files, vocabulary, tokenizer, split and step count), so its set of trained rows is the "
                  "shipped model's."]
    lines += ["", "The vocabulary keeps every gene counted in at least 5 corpus cells, but a cell's tokens are its 256 "
              "most expressed genes, so about half of the vocabulary was never a token and kept its random "
              "embedding. Everything below uses the seen genes only.", ""]
    lines += ["## Known gene sets", "",
              "Cohesion: mean pairwise cosine similarity of the set's seen members, around the mean seen gene "
              "(centred) unless marked raw. Null: random sets of the same size from the seen genes, matched on "
              "frequency (each random set takes as many genes from each decile of log1p(training cells in which "
              "the gene was a token) as the set has there) unless marked unmatched; effect = (cohesion - null "
              "mean) / null SD; p = (1 + #null >= cohesion) / (1 + n). Program columns: the commonest program "
              "among the members (programs of the same embedding), the share of members in it, that share's mean over "
              "the random sets, and its p-value. 'random control' is a seeded random set of 20 seen genes. "
              "Centring was chosen after seeing both variants (raw and centred are both reported).", ""]
    for name, table in tables.items():
        lines += [f"### {name}", ""] + enrichment_markdown(table) + [""]
        lines += [f"Enriched at p < {ALPHA}: {result['enrichment'][name]['n_enriched']} of "
                  f"{result['enrichment'][name]['n_tested']} tested sets "
                  f"({', '.join(result['enrichment'][name]['enriched']) or 'none'}); not enriched: "
                  f"{', '.join(result['enrichment'][name]['not_enriched']) or 'none'}.", ""]
    lines += ["## Gene programs", "",
              f"Leiden (resolution {s['resolution']}, igraph) on the cosine kNN graph (k = {s['n_neighbors']}, exact, "
              f"centred embeddings) of the {result['programs']['input']['n_genes_clustered']:,} seen genes; "
              f"programs of at least {s['min_size']} genes.", "",
              "| embedding | programs | sizes |", "|---|---|---|"]
    for name, info in result["programs"].items():
        lines.append(f"| {name} | {info['n_programs']} | {', '.join(str(n) for n in info['sizes'])} |")
    lines += ["", "Input-embedding programs: size, the reference sets whose commonest program it is, and (scored on "
              "the data with `sc.tl.score_genes`) the cell type with the highest mean score.", "",
              "| program | genes | reference sets | highest-scoring cell type (mean score) | next (mean score) |",
              "|---|---|---|---|---|"]
    holders = sets_in_programs(tables["input, centred, matched"])
    scores = result["program_scores"]
    for program, row in programs.iterrows():
        sc_row = scores.get(f"program_{program}", {})
        lines.append(f"| {program} | {row['n_genes']} | {holders.get(program, '')} | "
                     f"{sc_row.get('top_cell_type', 'n/a')} ({fmt(sc_row.get('top_mean'))}) | "
                     f"{sc_row.get('second_cell_type', 'n/a')} ({fmt(sc_row.get('second_mean'))}) |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["timings_s"].items()), ""]
    path.write_text("\n".join(lines))


def summarise(table: pd.DataFrame) -> dict:
    tested = table[np.isfinite(table["p_value"])]
    enriched = tested.index[tested["p_value"] < ALPHA].tolist()
    return {"n_tested": len(tested), "n_enriched": len(enriched), "enriched": enriched,
            "not_enriched": [n for n in tested.index if n not in enriched],
            "untested": table.index[~np.isfinite(table["p_value"])].tolist(),
            "rows": json.loads(table.reset_index().to_json(orient="records"))}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="atlasformer-public-small")
    parser.add_argument("--data", default=str(SHARED / "pbmc4k_10x_v2.h5ad"))
    parser.add_argument("--labels-key", default="cell_type")
    parser.add_argument("--corpus-dir", default=str(SHARED))
    parser.add_argument("--optimizer-state", default=None)
    parser.add_argument("--max-cells", type=int, default=2000)
    parser.add_argument("--n-permutations", type=int, default=1000)
    parser.add_argument("--n-neighbors", type=int, default=15)
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--min-size", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start, timings = time.perf_counter(), {}
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "command": "OMP_NUM_THREADS=1 python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])}

    tick = time.perf_counter()
    corpus = corpus_files(args.model, Path(args.corpus_dir))
    ge = G.gene_embeddings(args.model, data=args.data, corpus=corpus, max_cells=args.max_cells, seed=args.seed, cpu=True)
    timings["embeddings"] = time.perf_counter() - tick
    corpus_seen = ge.obs["seen_in_pretraining"].to_numpy(dtype=bool) if corpus else None
    result["seen"] = seen_agreement(ge, corpus_seen, args.optimizer_state, args.model)
    result["seen"]["seen_from"] = ge.uns["gene_embeddings"]["seen_from"]

    tick = time.perf_counter()
    program_kw = dict(n_neighbors=args.n_neighbors, resolution=args.resolution, seed=args.seed, min_size=args.min_size)
    programs = G.gene_programs(ge, **program_kw)
    result["programs"] = {"input": {"n_programs": len(programs), "sizes": programs["n_genes"].tolist(),
                                    "n_genes_clustered": ge.uns["program"]["n_genes_clustered"]}}
    context_programs = None
    if G.CONTEXT_LAYER in ge.layers:
        context_programs = G.gene_programs(ge, use_rep="context", key_added="context_program", **program_kw)
        result["programs"]["context"] = {"n_programs": len(context_programs),
                                         "sizes": context_programs["n_genes"].tolist(),
                                         "n_genes_clustered": ge.uns["context_program"]["n_genes_clustered"]}
    timings["programs"] = time.perf_counter() - tick

    tick = time.perf_counter()
    sets = G.reference_gene_sets(ge)
    seen_ids = ge.obs_names[ge.obs["seen_in_pretraining"].to_numpy(dtype=bool)]
    sets["random control"] = list(np.random.default_rng(args.seed).choice(seen_ids, size=20, replace=False))
    tables = enrichment_runs(ge, sets, args.n_permutations, args.seed)
    result["enrichment"] = {name: summarise(table) for name, table in tables.items()}
    timings["enrichment"] = time.perf_counter() - tick

    tick = time.perf_counter()
    result["program_scores"] = program_scores_by_cell_type(args.data, programs, args.labels_key, max_programs=len(programs))
    timings["scoring"] = time.perf_counter() - tick

    result["settings"] = {"model": args.model, "data": os.path.relpath(args.data, REPO), "n_cells": ge.uns[
        "gene_embeddings"].get("n_cells"), "max_cells": args.max_cells, "n_permutations": args.n_permutations,
        "n_neighbors": args.n_neighbors, "resolution": args.resolution, "min_size": args.min_size, "seed": args.seed,
        "corpus": [f.name for f in corpus] if corpus else None}
    result["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    result["wall_time_s"] = time.perf_counter() - start
    result["machine"]["load_average_end"] = os.getloadavg()[0]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gene_programs.json").write_text(json.dumps(result, indent=1, default=str))
    write_markdown(out / "gene_programs.md", result, tables, programs, context_programs)

    headline = tables["input, centred, matched"].loc["ribosomal"]
    context = tables.get("context, centred, matched")
    return {
        "ribosomal_effect_input": round(float(headline["effect"]), 2), "ribosomal_p_input": float(headline["p_value"]),
        "sets_enriched_input": f"{result['enrichment']['input, centred, matched']['n_enriched']}/"
                               f"{result['enrichment']['input, centred, matched']['n_tested']}",
        "sets_enriched_context": (f"{result['enrichment']['context, centred, matched']['n_enriched']}/"
                                  f"{result['enrichment']['context, centred, matched']['n_tested']}")
        if context is not None else None,
        "n_seen": int(ge.obs["seen_in_pretraining"].sum()), "n_programs": len(programs),
        "weights_vs_corpus_agreement": result["seen"].get("weights_vs_corpus_agreement"),
        "wall_time_s": round(result["wall_time_s"], 1),
    }


if __name__ == "__main__":
    print(json.dumps(main()))
