"""The CLI's analysis commands: ``map``, ``index build|search``, ``genes embed|programs|network|perturb``,
``cluster`` and ``trajectory``. :func:`add_analysis_commands` adds them to ``atlasformer``'s parser
(``atlasformer.cli``); each ``cmd_*`` reads its inputs, calls one scanpy-shaped function of the stages and writes
its outputs atomically into ``--output``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from atlasformer.config import ConfigError
from atlasformer.tokenization.corpus_format import write_json_atomic
from atlasformer.tokenization.outputs import write_csv_atomic

SHIPPED_MODEL = "atlasformer-public-small"


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an output folder holding files atlasformer did not write (never over an input)")


def _add_counts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer", help="read counts from this layer instead of X")
    p.add_argument("--gene-key", help="var column with gene identifiers instead of var_names")


def _add_model(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument("--model", metavar="PATH_OR_HUB_ID", help=default_help)
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")


def _model(args) -> str:
    return args.model or SHIPPED_MODEL


def _prepared(args, writes: list, reads: list, command: str) -> Path:
    from atlasformer.finetune import prepare_outputs

    return prepare_outputs(args.output, writes, reads=tuple(str(r) for r in reads if r), overwrite=args.overwrite,
                           command=command)


# ----------------------------------------------------------------------------------------- map
def cmd_map(args) -> int:
    from atlasformer.finetune.common import write_h5ad_atomic
    from atlasformer.finetune.mapping import map_query, plot_mapping
    from atlasformer.finetune.runner import annotated_path
    from atlasformer.tokenization import read_h5ad

    model = None if args.representation == "expression" else _model(args)
    output = _prepared(args, [args.query], [args.reference, model], "map")
    reference, query = read_h5ad(args.reference, backed=False), read_h5ad(args.query, backed=False)
    mapped = map_query(reference, query, model, labels_key=args.labels_key, batch_key=args.batch_key, layer=args.layer,
                       gene_key=args.gene_key, representation=args.representation, n_neighbors=args.n_neighbors,
                       unknown_confidence=args.unknown_confidence, with_x=args.with_x, cpu=args.cpu)
    plot_mapping(reference, mapped, output / "mapping.png", labels_key=args.labels_key)
    print(f"wrote {write_h5ad_atomic(mapped, annotated_path(args.query, output))}")
    summary = {k: (v.item() if hasattr(v, "item") else v) for k, v in mapped.uns["atlasformer_mapping"].items()}
    summary["label_counts"] = mapped.obs["atlasformer_label"].value_counts().astype(int).to_dict()
    write_json_atomic(output / "mapping.json", summary)
    print(json.dumps(summary, indent=1, default=str))
    return 0


def add_map(sub) -> None:
    p = sub.add_parser("map", help="map a query onto a labelled reference: labels, uncertainty, reference UMAP",
                       description="Map query cells onto a labelled reference (docs/mapping.md).")
    p.add_argument("--reference", required=True, metavar="FILE", help="labelled reference h5ad (raw counts)")
    p.add_argument("--query", required=True, metavar="FILE", help="query h5ad (raw counts; genes may differ in part)")
    p.add_argument("--labels-key", required=True, help="reference obs column with the labels to transfer")
    p.add_argument("--batch-key", help="reference obs column with batches (the calibration's folds; recommended)")
    _add_model(p, f"model folder, fine-tuned folder or hub id (default: {SHIPPED_MODEL})")
    _add_output(p)
    _add_counts(p)
    p.add_argument("--representation", choices=["joint", "expression", "embedding"],
                   help="what the kNN compares (default: joint, expression PCs beside the model's embedding)")
    p.add_argument("--n-neighbors", type=int, default=15, help="reference cells voting per query cell (default 15)")
    p.add_argument("--unknown-confidence", type=float, default=0.5,
                   help="calibrated confidence below which a cell is 'unknown' (default 0.5; 0 turns it off)")
    p.add_argument("--with-x", action="store_true", help="copy the query's X into the output file")
    p.set_defaults(run=cmd_map, takes_overrides=False)


# ----------------------------------------------------------------------------------------- index
def _embedded(path, args, model: str):
    """``path`` read into memory, with the zero-shot embedding ``obsm[args.use_rep]`` computed by ``model`` when
    the file does not hold it already."""
    from atlasformer.api import embed
    from atlasformer.tokenization import read_h5ad

    adata = read_h5ad(path, backed=False)
    if args.use_rep not in adata.obsm:
        if args.use_rep != "X_atlasformer":
            raise ConfigError(f"{path}: obsm[{args.use_rep!r}] is absent; only X_atlasformer is computed here (by the "
                              "model). Write the embedding first, or leave --use-rep at X_atlasformer.")
        embed(adata, model, layer=args.layer, gene_key=args.gene_key, cpu=args.cpu)
    return adata


def _absolute_if_folder(model: str) -> str:
    """A local model folder as an absolute path (index.json records it, and a search may run from elsewhere);
    a shipped name or hub id as given."""
    return str(Path(model).resolve()) if Path(model).is_dir() else model


def cmd_index_build(args) -> int:
    from atlasformer.finetune.cell_index import build_index
    from atlasformer.tokenization.outputs import refuse_output_over_inputs

    refuse_output_over_inputs([args.output], [args.data, _model(args)])
    adata = _embedded(args.data, args, _absolute_if_folder(_model(args)))
    index = build_index(adata, use_rep=args.use_rep, obs_keys=args.obs_keys)
    folder = index.save(args.output, overwrite=args.overwrite)
    print(f"wrote {folder}: {index!r}")
    return 0


def cmd_index_search(args) -> int:
    from atlasformer.finetune.cell_index import CellIndex, search_index
    from atlasformer.tokenization import input_stem

    output = _prepared(args, [], [args.index, args.data, args.model], "index search")
    index = CellIndex.load(args.index)
    model = args.model or (index.provenance or {}).get("model") or SHIPPED_MODEL
    if args.use_rep != index.embedding_key:
        raise ConfigError(f"the index holds obsm[{index.embedding_key!r}] embeddings; search with --use-rep "
                          f"{index.embedding_key}.")
    adata = _embedded(args.data, args, model)
    table = search_index(index, adata, use_rep=args.use_rep, k=args.k)
    path = write_csv_atomic(table, output / f"{input_stem(args.data)}_neighbours.csv")
    print(f"wrote {path} ({adata.n_obs} query cells x {args.k} neighbours; model {model})")
    return 0


def add_index(sub) -> None:
    index = sub.add_parser("index", help="cell search over a reference (build an index, search it)",
                           description="Approximate nearest-neighbour search over reference cell embeddings.")
    index_sub = index.add_subparsers(dest="index_command", required=True)
    p = index_sub.add_parser("build", help="index a reference's cell embeddings with its obs",
                             description="Write an index folder (index.faiss, obs.parquet, index.json).")
    p.add_argument("--data", required=True, metavar="FILE", help="the reference h5ad")
    _add_model(p, f"model that embeds the cells when obsm lacks --use-rep (default: {SHIPPED_MODEL})")
    p.add_argument("--use-rep", default="X_atlasformer", metavar="KEY", help="obsm key of the embedding")
    p.add_argument("--obs-keys", nargs="+", metavar="COL", help="obs columns kept for the results (default: all)")
    p.add_argument("--output", required=True, metavar="DIR", help="the index folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index folder")
    _add_counts(p)
    p.set_defaults(run=cmd_index_build, takes_overrides=False)

    p = index_sub.add_parser("search", help="the k most similar reference cells of each query cell",
                             description="Search an index; writes <output>/<query stem>_neighbours.csv.")
    p.add_argument("--index", required=True, metavar="DIR", help="a folder written by `atlasformer index build`")
    p.add_argument("--data", required=True, metavar="FILE", help="the query h5ad")
    _add_model(p, "model that embeds the query (default: the one recorded in the index)")
    p.add_argument("--use-rep", default="X_atlasformer", metavar="KEY", help="obsm key of the embedding")
    p.add_argument("--k", type=int, default=10, help="neighbours per query cell (default 10)")
    _add_output(p)
    _add_counts(p)
    p.set_defaults(run=cmd_index_search, takes_overrides=False)


# ----------------------------------------------------------------------------------------- genes
def cmd_genes_embed(args) -> int:
    from atlasformer.analysis.genes import GENE_EMBEDDINGS_FILE, gene_embeddings
    from atlasformer.finetune.common import write_h5ad_atomic

    output = _prepared(args, [], [*(args.data or []), *(args.corpus or []), _model(args)], "genes embed")
    genes = gene_embeddings(_model(args), data=args.data[0] if args.data else None, layer=args.layer,
                            gene_key=args.gene_key, corpus=args.corpus, max_cells=args.max_cells, cpu=args.cpu)
    print(f"wrote {write_h5ad_atomic(genes, output / GENE_EMBEDDINGS_FILE)} ({genes.n_obs} genes x {genes.n_vars} "
          f"dimensions; {int(genes.obs['seen_in_pretraining'].sum())} seen in pretraining)")
    return 0


def _read_gmt(path) -> dict[str, list[str]]:
    """Gene sets of a GMT file: one set a line, ``name<TAB>description<TAB>gene<TAB>gene...``."""
    if not Path(path).is_file():
        raise ConfigError(f"--gene-sets {path}: no such file; pass a GMT file of gene sets.")
    sets = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = [f.strip() for f in line.split("\t")]
        if not line.strip():
            continue
        if len(fields) < 3 or not fields[0]:
            raise ConfigError(f"{path}, line {number}: a GMT line is 'name<TAB>description<TAB>gene<TAB>gene...' "
                              "(tab-separated, genes as symbols or gene IDs).")
        sets[fields[0]] = [g for g in fields[2:] if g]
    if not sets:
        raise ConfigError(f"{path}: holds no gene set; write one set per line as a GMT file.")
    return sets


def cmd_genes_programs(args) -> int:
    from atlasformer.analysis.genes import (
        CONTEXT_LAYER,
        GENE_EMBEDDINGS_FILE,
        gene_embeddings,
        gene_programs,
        gene_set_enrichment,
        score_programs,
    )
    from atlasformer.finetune.common import output_adata, write_h5ad_atomic
    from atlasformer.finetune.runner import annotated_path
    from atlasformer.tokenization import read_h5ad

    output = _prepared(args, [args.data], [*(args.corpus or []), args.gene_sets, _model(args)], "genes programs")
    gene_sets = _read_gmt(args.gene_sets) if args.gene_sets else None  # a bad file fails before any work
    genes = gene_embeddings(_model(args), data=args.data, layer=args.layer, gene_key=args.gene_key,
                            corpus=args.corpus, max_cells=args.max_cells, cpu=args.cpu)
    use_rep = CONTEXT_LAYER if args.context else None
    programs = gene_programs(genes, resolution=args.resolution, use_rep=use_rep)
    enrichment = gene_set_enrichment(genes, gene_sets, use_rep=use_rep)
    write_h5ad_atomic(genes, output / GENE_EMBEDDINGS_FILE)
    table = programs.reset_index()
    for column in ("gene_ids", "symbols"):  # comma-joined, as enrichment.csv's members: no Python list reprs
        table[column] = table[column].map(lambda genes: ",".join(map(str, genes)))
    write_csv_atomic(table, output / "programs.csv")
    write_csv_atomic(enrichment.reset_index(), output / "enrichment.csv")
    adata = read_h5ad(args.data, backed=False)
    target = output_adata(adata, False)
    columns = score_programs(adata, programs, layer=args.layer, gene_key=args.gene_key)
    for column in columns:
        target.obs[column] = adata.obs[column].to_numpy()
    print(f"{len(programs)} programs; wrote {output / 'programs.csv'}, {output / 'enrichment.csv'}, "
          f"{write_h5ad_atomic(target, annotated_path(args.data, output))}")
    print(enrichment.to_string(max_cols=8))
    return 0


def cmd_genes_network(args) -> int:
    from atlasformer.analysis.attention import attention_network
    from atlasformer.tokenization import read_h5ad

    output = _prepared(args, [], [args.data, _model(args)], "genes network")
    adata = read_h5ad(args.data, backed=False)
    heads = int(args.heads) if args.heads.isdigit() else args.heads
    edges = attention_network(adata, _model(args), groupby=args.groupby, layer=args.attention_layer, heads=heads,
                              max_cells_per_group=args.max_cells_per_group, top_edges=args.top_edges,
                              gene_key=args.gene_key, counts_layer=args.layer, cpu=args.cpu)
    path = write_csv_atomic(edges, output / "attention_edges.csv")
    print(f"wrote {path} ({len(edges)} edges over {edges['group'].nunique()} groups)")
    return 0


def cmd_genes_perturb(args) -> int:
    from atlasformer.analysis.perturb import perturb_genes, rank_genes_by_effect
    from atlasformer.tokenization import read_h5ad

    output = _prepared(args, [], [args.data, _model(args)], "genes perturb")
    adata = read_h5ad(args.data, backed=False)
    genes = [g.split("+") if "+" in g else g for g in args.genes]
    results = perturb_genes(adata, _model(args), genes, mode=args.mode, cells=args.cells, target=args.target,
                            gene_key=args.gene_key, counts_layer=args.layer, cpu=args.cpu)
    ranked = rank_genes_by_effect(results)
    write_csv_atomic(results, output / "perturbation_per_cell.csv")
    write_csv_atomic(ranked, output / "perturbation_ranked.csv")
    print(ranked.head(20).to_string())
    print(f"{results.attrs.get('genes_x_cells_per_s', float('nan')):.1f} genes x cells per second; wrote "
          f"{output / 'perturbation_ranked.csv'} and {output / 'perturbation_per_cell.csv'}")
    return 0


def add_genes(sub) -> None:
    genes = sub.add_parser("genes", help="what the model knows about genes", description="Gene-level analyses.")
    genes_sub = genes.add_subparsers(dest="genes_command", required=True)
    p = genes_sub.add_parser("embed", help="gene embeddings (input, and context-aware with --data)",
                             description="Write <output>/gene_embeddings.h5ad (genes x dimensions).")
    _add_model(p, f"model folder or hub id (default: {SHIPPED_MODEL})")
    p.add_argument("--data", nargs=1, metavar="FILE", help="cells for the context-aware embedding (layers['context'])")
    p.add_argument("--corpus", nargs="+", metavar="FILE",
                   help="the pretraining corpus files, in pretraining's order: which genes were seen, exactly")
    p.add_argument("--max-cells", type=int, default=5000, help="cells of --data used (seeded subsample)")
    _add_output(p)
    _add_counts(p)
    p.set_defaults(run=cmd_genes_embed, takes_overrides=False)

    p = genes_sub.add_parser("programs", help="gene programs (Leiden on gene embeddings), scored per cell",
                             description="Gene programs, their enrichment for known gene sets, and per-cell scores.")
    _add_model(p, f"model folder or hub id (default: {SHIPPED_MODEL})")
    p.add_argument("--data", required=True, metavar="FILE", help="cells to score the programs in (raw counts)")
    p.add_argument("--context", action="store_true", help="cluster the context-aware embedding (from --data)")
    p.add_argument("--resolution", type=float, default=1.0, help="Leiden resolution (default 1.0)")
    p.add_argument("--corpus", nargs="+", metavar="FILE", help="the pretraining corpus files (which genes were seen)")
    p.add_argument("--gene-sets", metavar="GMT", help="gene sets to test for enrichment, one per line: "
                   "name<TAB>description<TAB>genes... (default: built-in human PBMC sets)")
    p.add_argument("--max-cells", type=int, default=5000, help="cells of --data for the context embedding")
    _add_output(p)
    _add_counts(p)
    p.set_defaults(run=cmd_genes_programs, takes_overrides=False)

    p = genes_sub.add_parser("network", help="gene-gene networks from attention, per cell population",
                             description="Average attention between genes per obs group; top edges as a table.")
    _add_model(p, f"model folder or hub id (default: {SHIPPED_MODEL})")
    p.add_argument("--data", required=True, metavar="FILE", help="cells (raw counts)")
    p.add_argument("--groupby", required=True, help="obs column of the cell populations")
    p.add_argument("--attention-layer", type=int, default=-1, help="transformer layer (default -1, the last)")
    p.add_argument("--heads", default="mean", help="'mean' over heads, 'each', or one head's index")
    p.add_argument("--max-cells-per-group", type=int, default=500, help="cells per population (seeded subsample)")
    p.add_argument("--top-edges", type=int, default=100, help="edges kept per population")
    _add_output(p)
    _add_counts(p)
    p.set_defaults(run=cmd_genes_network, takes_overrides=False)

    p = genes_sub.add_parser("perturb", help="in-silico deletion / over-expression, ranked by effect",
                             description="Perturb genes in cells, re-embed, rank genes by the shift (toward --target).")
    _add_model(p, f"model folder or hub id (default: {SHIPPED_MODEL})")
    p.add_argument("--data", required=True, metavar="FILE", help="cells (raw counts)")
    p.add_argument("--genes", required=True, nargs="+", metavar="GENE",
                   help="genes to perturb one at a time; GENE1+GENE2 perturbs a set together")
    p.add_argument("--mode", choices=["delete", "overexpress"], default="delete", help="delete (default) or overexpress")
    p.add_argument("--cells", metavar="KEY=VALUE", help="perturb only these cells (obs_key=value)")
    p.add_argument("--target", metavar="KEY=VALUE", help="rank by the move toward this state's centroid")
    _add_output(p)
    _add_counts(p)
    p.set_defaults(run=cmd_genes_perturb, takes_overrides=False)


# ----------------------------------------------------------------------------------------- cells
def _annotate_cells(args, command: str, run) -> int:
    """Read ``--data``, run ``run(adata, output) -> (figure path, summary)``, write the annotated copy."""
    from atlasformer.finetune.common import write_h5ad_atomic
    from atlasformer.finetune.runner import annotated_path
    from atlasformer.tokenization import read_h5ad

    output = _prepared(args, [args.data], [], command)
    adata = read_h5ad(args.data, backed=False)
    summary = run(adata, output)
    if not args.with_x:
        adata.X = None
        adata.layers.clear()  # the results are in obs / obsm / obsp / uns; counts stay in the input
    print(f"wrote {write_h5ad_atomic(adata, annotated_path(args.data, output))}")
    write_json_atomic(output / f"{command}.json", summary)
    print(json.dumps(summary, indent=1, default=str))
    return 0


def cmd_cluster(args) -> int:
    from atlasformer.analysis.cells import cluster, cluster_scores, plot_clusters

    def run(adata, output):
        cluster(adata, use_rep=args.use_rep, n_neighbors=args.n_neighbors, resolution=args.resolution,
                seed=args.seed, layer=args.layer)
        color = [args.labels_key] if args.labels_key else []
        plot_clusters(adata, output / "clusters.png", color=color)
        summary = {"use_rep": args.use_rep, "resolution": args.resolution, "n_clusters": int(adata.obs["leiden"].nunique())}
        if args.labels_key:
            summary |= cluster_scores(adata, labels_key=args.labels_key)
        return summary

    return _annotate_cells(args, "cluster", run)


def cmd_trajectory(args) -> int:
    from atlasformer.analysis.cells import plot_trajectory, trajectory

    if (args.root_cell is None) == (args.root_label is None):
        raise ConfigError("trajectory needs one root: --root-cell OBS_NAME or --root-label LABEL (with --root-key).")

    def run(adata, output):
        trajectory(adata, use_rep=args.use_rep, root_cell=args.root_cell, root_label=args.root_label,
                   groups_key=args.groups_key, root_key=args.root_key, root_rule=args.root_rule,
                   n_neighbors=args.n_neighbors, resolution=args.resolution, seed=args.seed, layer=args.layer)
        color = [args.root_key] if args.root_key and args.root_key != args.groups_key else []
        plot_trajectory(adata, output / "trajectory.png", groups_key=args.groups_key, color=color)
        pseudotime = adata.obs["dpt_pseudotime"]
        return {"use_rep": args.use_rep, "root_cell": str(adata.obs_names[int(adata.uns["iroot"])]),
                "root_rule": adata.uns["trajectory"]["params"]["root_rule"],
                "n_groups": int(adata.obs[args.groups_key].nunique()),
                "pseudotime_finite_fraction": float(pseudotime.replace([float("inf")], float("nan")).notna().mean())}

    return _annotate_cells(args, "trajectory", run)


def _add_cells_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="FILE", help="h5ad holding the embedding in obsm")
    p.add_argument("--use-rep", required=True, metavar="KEY",
                   help="obsm key: X_atlasformer (atlasformer embed), X_atlasformer_integrated, X_scvi, or X_pca "
                        "(computed from the counts when absent)")
    p.add_argument("--n-neighbors", type=int, default=15, help="neighbours of the kNN graph (default 15)")
    p.add_argument("--resolution", type=float, default=1.0, help="Leiden resolution (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of Leiden and UMAP")
    p.add_argument("--layer", help="counts layer (only for computing X_pca)")
    p.add_argument("--with-x", action="store_true", help="copy X and layers into the output file")
    _add_output(p)


def add_cells(sub) -> None:
    p = sub.add_parser("cluster", help="Leiden clusters and a UMAP on any embedding",
                       description="Cluster cells on an obsm embedding (scanpy neighbors + Leiden + UMAP).")
    _add_cells_common(p)
    p.add_argument("--labels-key", help="obs column of known labels: ARI / NMI of the clusters against it")
    p.set_defaults(run=cmd_cluster, takes_overrides=False)

    p = sub.add_parser("trajectory", help="PAGA and diffusion pseudotime on any embedding",
                       description="Trajectory on an obsm embedding: diffusion map, PAGA, DPT from a root.")
    _add_cells_common(p)
    p.add_argument("--root-cell", metavar="OBS_NAME", help="the root cell's obs name")
    p.add_argument("--root-label", metavar="LABEL", help="a label whose most extreme cell is the root")
    p.add_argument("--root-key", metavar="COL", help="obs column holding --root-label (default: --groups-key)")
    p.add_argument("--root-rule", choices=["farthest", "first_component"], default="farthest",
                   help="which cell of --root-label is the root (default farthest; docs/cells.md)")
    p.add_argument("--groups-key", default="leiden", metavar="COL",
                   help="obs column of the groups PAGA connects (default leiden: computed at --resolution)")
    p.set_defaults(run=cmd_trajectory, takes_overrides=False)


def add_analysis_commands(sub) -> None:
    """Add ``map``, ``index``, ``genes``, ``cluster`` and ``trajectory`` to the top-level subparsers."""
    add_map(sub)
    add_index(sub)
    add_genes(sub)
    add_cells(sub)
