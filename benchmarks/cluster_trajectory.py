"""Clustering and trajectories on each embedding, side by side (atlasformer.analysis.cells).

(a) Clustering: on the public labelled files (kang_pbmc_8donors `cell_type`, cellbench_lung_lines_5batches
`cell_line`, baron_mouse_pancreas `cell_type`), Leiden at resolution 1.0 (15 neighbours, seed 0) on each
embedding, scored against the labels by ARI and NMI. Embeddings: `pca` (50 PCs of 2,000 log-normalised HVGs,
scanpy's recipe), `scvi` (atlasformer's SCVIModel on the same HVGs with the batch covariate `batch`,
epochs capped), `atlasformer_zeroshot` (the pretrained model's cell embedding, not fine-tuned) and
`atlasformer_integrated` (integration fine-tuning of that model at its default recipe, without labels).

(b) Trajectories: on a simulated branching trajectory with known time (simulate_trajectory: 2,000 cells,
500 genes, a trunk then two branches), diffusion pseudotime from the earliest cell on each embedding,
scored by Spearman's rho with the true time; and from the root label "trunk" by each root rule. Embeddings:
`pca`, `scvi` (no batch), `atlasformer_sim_pretrained` (zero-shot embedding of a tiny model pretrained on
these simulated cells), `atlasformer_zeroshot` (the shipped model: the simulated gene names are not in its
vocabulary, so this is reported as not runnable) and `atlasformer_zeroshot_renamed` (the shipped model on the
same counts with the genes renamed to a seeded sample of its vocabulary: runs, but the programs have nothing
to do with those genes' biology).

    OMP_NUM_THREADS=1 python benchmarks/cluster_trajectory.py [--model atlasformer-public-small]
        [--scvi-epochs 50] [--pretrain-steps 1000] [--plots-dir DIR] [--output benchmarks/results/cluster_trajectory]

One torch / BLAS / numba thread; every seed is 0. Writes <output>.md and <output>.json and prints the JSON
object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from scipy.stats import spearmanr

from atlasformer.analysis.cells import (
    cluster,
    cluster_scores,
    ensure_representation,
    plot_clusters,
    plot_trajectory,
    trajectory,
)
from atlasformer.finetune import FinetuneConfig, Integrator, SCVIModel
from atlasformer.finetune.common import (
    frozen_embeddings,
    load_backbone,
    read_counts,
    to_inference_device,
    tokenize_for_model,
)
from atlasformer.finetune.integration import highly_variable
from atlasformer.pretrain import PretrainConfig, train
from atlasformer.tokenization import InputError, TokenizerConfig
from atlasformer.tokenization.simulate import simulate_trajectory

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DATASETS = {"kang_pbmc_8donors": "cell_type", "cellbench_lung_lines_5batches": "cell_line",
            "baron_mouse_pancreas": "cell_type"}
"""File stem -> its label column; every file's batches are in obs['batch']."""
BATCH_KEY = "batch"
SEED = 0
RESOLUTION = 1.0
N_NEIGHBORS = 15
SIMULATION = {"n_cells": 2000, "n_genes": 500, "n_branches": 2, "seed": SEED}


# ------------------------------------------------------------------ embeddings
def pca_embedding(adata: ad.AnnData) -> np.ndarray:
    """50 PCs of 2,000 log-normalised HVGs: what cluster(use_rep="X_pca") computes from counts."""
    work = ad.AnnData(adata.X, obs=adata.obs[[]].copy(), var=adata.var[[]].copy())
    ensure_representation(work, "X_pca", seed=SEED)
    return work.obsm["X_pca"]


def scvi_embedding(adata: ad.AnnData, batch_key: str | None, epochs: int) -> np.ndarray:
    """scVI latent (10 dims) on the HVGs, trained on every cell; zeros for cells without counts there."""
    counts = read_counts(adata)
    hvg = np.flatnonzero(highly_variable(counts))
    keep = np.asarray(counts[:, hvg].sum(1)).ravel() > 0
    work = adata[keep][:, hvg].copy()
    model = SCVIModel(batch_key=batch_key, epochs=epochs, seed=SEED)
    model.fit(work)
    latent = np.zeros((adata.n_obs, 10), dtype=np.float32)
    latent[keep] = model.embed(work)
    return latent


def zero_shot_embedding(adata: ad.AnnData, model: str, source: str) -> np.ndarray:
    """(cells, d_model) cell embeddings of the pretrained backbone, the numbers atlasformer.api.cell_embeddings
    gives (zeros for cells without vocabulary genes). Computed through finetune's frozen-embedding cache, so the
    integration fine-tuning that follows (frozen backbone) reuses this forward pass instead of repeating it."""
    backbone, tokenizer, _ = load_backbone(model, FinetuneConfig(), [adata])
    to_inference_device(backbone)
    data = tokenize_for_model(adata, tokenizer, source=source)
    out = np.zeros((adata.n_obs, backbone.config.d_model), dtype=np.float32)
    out[data.cells.cell_index] = frozen_embeddings(backbone, data.cells, tokenizer)
    return out


def integrated_embedding(adata: ad.AnnData, model: str, source: str) -> np.ndarray:
    """Integration fine-tuning of ``model`` at its default recipe, without labels; the embedding of every cell."""
    integrator = Integrator(model, FinetuneConfig(seed=SEED), batch_key=BATCH_KEY)
    integrator.fit(adata, source=source)
    return integrator.embed(adata, source=source)


def pretrain_on(adata: ad.AnnData, folder: Path, steps: int) -> str:
    """A small model (2 layers, width 64) pretrained on ``adata``'s cells with the shipped model's objectives
    (masked values + MVC, binned values, 256 genes per cell); returns its model folder."""
    data = folder / "simulated.h5ad"
    adata.write_h5ad(data)
    cfg = PretrainConfig(data=(str(data),), output=str(folder / "run"), seed=SEED, threads=1,
                         model={"d_model": 64, "n_layers": 2, "n_heads": 4, "dropout": 0.0},
                         tokenizer=TokenizerConfig(max_seq_len=256), objectives={"masked_value": 1.0, "mvc": 1.0},
                         max_steps=steps, batch_size=32, lr=2e-3,
                         warmup_steps=max(1, steps // 10), eval_every=steps, save_every=steps, log_every=50)
    return str(train(cfg))


def renamed_to_vocabulary(adata: ad.AnnData, model: str) -> ad.AnnData:
    """A copy whose genes are named after a seeded sample of ``model``'s vocabulary genes."""
    _, tokenizer, _ = load_backbone(model, FinetuneConfig(), [adata])
    genes = np.random.default_rng(SEED).choice(np.asarray(tokenizer.vocab.genes), adata.n_vars, replace=False)
    renamed = adata.copy()
    renamed.var_names = genes
    return renamed


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, round(time.perf_counter() - start, 1)


def embedding_view(obs, embedding: np.ndarray) -> ad.AnnData:
    view = ad.AnnData(obs=obs.copy())
    view.obsm["X_emb"] = np.asarray(embedding, dtype=np.float32)
    return view


# ------------------------------------------------------------------ (a) clustering
def clustering_rows(name: str, labels_key: str, args) -> list[dict]:
    adata = ad.read_h5ad(DATA / f"{name}.h5ad")
    makers = {"pca": lambda: pca_embedding(adata),
              "scvi": lambda: scvi_embedding(adata, BATCH_KEY, args.scvi_epochs),
              "atlasformer_zeroshot": lambda: zero_shot_embedding(adata, args.model, name),
              "atlasformer_integrated": lambda: integrated_embedding(adata, args.model, name)}
    rows = []
    for method, make in makers.items():
        embedding, embed_seconds = timed(make)
        view = embedding_view(adata.obs[[labels_key, BATCH_KEY]], embedding)
        _, cluster_seconds = timed(lambda v=view: cluster(v, use_rep="X_emb", n_neighbors=N_NEIGHBORS,
                                                          resolution=RESOLUTION, seed=SEED,
                                                          umap=args.plots_dir is not None))
        scores = cluster_scores(view, labels_key=labels_key)
        rows.append({"dataset": name, "embedding": method, "ari": round(scores["ari"], 4),
                     "nmi": round(scores["nmi"], 4), "n_clusters": int(view.obs["leiden"].nunique()),
                     "n_labels": int(view.obs[labels_key].nunique()), "n_cells": int(adata.n_obs),
                     "dims": int(embedding.shape[1]), "embed_seconds": embed_seconds,
                     "cluster_seconds": cluster_seconds})
        print(json.dumps(rows[-1]), file=sys.stderr)
        if args.plots_dir:
            plot_clusters(view, Path(args.plots_dir) / f"clusters_{name}_{method}.png", color=[labels_key, BATCH_KEY],
                          title=method)
    return rows


# ------------------------------------------------------------------ (b) trajectories
def trajectory_embeddings(sim: ad.AnnData, args, workdir: Path) -> tuple[dict, dict, dict]:
    """({name: embedding}, {name: seconds}, {name: why it did not run})."""
    embeddings, seconds, not_run = {}, {}, {}
    embeddings["pca"], seconds["pca"] = timed(pca_embedding, sim)
    embeddings["scvi"], seconds["scvi"] = timed(scvi_embedding, sim, None, args.scvi_epochs)

    def pretrained_then_embedded():
        return zero_shot_embedding(sim, pretrain_on(sim, workdir, args.pretrain_steps), "simulated")

    embeddings["atlasformer_sim_pretrained"], seconds["atlasformer_sim_pretrained"] = timed(pretrained_then_embedded)
    try:
        embeddings["atlasformer_zeroshot"], seconds["atlasformer_zeroshot"] = timed(
            zero_shot_embedding, sim, args.model, "simulated")
    except InputError as err:  # the simulated gene names are no genes of its vocabulary
        not_run["atlasformer_zeroshot"] = str(err)
    renamed = renamed_to_vocabulary(sim, args.model)
    embeddings["atlasformer_zeroshot_renamed"], seconds["atlasformer_zeroshot_renamed"] = timed(
        zero_shot_embedding, renamed, args.model, "simulated_renamed")
    return embeddings, seconds, not_run


def pseudotime_score(traced: ad.AnnData) -> dict:
    pseudotime = traced.obs["dpt_pseudotime"].to_numpy()
    finite = np.isfinite(pseudotime)
    rho = spearmanr(pseudotime[finite], traced.obs["true_time"].to_numpy()[finite]).statistic
    return {"spearman": round(float(rho), 4), "finite_fraction": round(float(finite.mean()), 4),
            "root_true_time": round(float(traced.obs["true_time"].iloc[traced.uns["iroot"]]), 4),
            "n_groups": int(traced.obs["leiden"].nunique())}


ROOTS = {"earliest_cell": {}, "label_farthest": {"root_rule": "farthest"},
         "label_first_component": {"root_rule": "first_component"}}
"""How the root is given: the cell with the smallest true time, or the label "trunk" by each rule."""


def trajectory_rows(args) -> tuple[list[dict], dict]:
    sim = simulate_trajectory(**SIMULATION)
    earliest = int(np.argmin(sim.obs["true_time"].to_numpy()))
    with tempfile.TemporaryDirectory() as tmp:
        embeddings, seconds, not_run = trajectory_embeddings(sim, args, Path(tmp))
    rows = []
    for method, embedding in embeddings.items():
        view = embedding_view(sim.obs, embedding)
        for root, settings in ROOTS.items():
            given = ({"root_cell": earliest} if root == "earliest_cell" else
                     {"root_label": "trunk", "root_key": "branch", **settings})
            plot = args.plots_dir is not None and root == "earliest_cell"
            traced, trajectory_seconds = timed(lambda v=view, g=given, p=plot: trajectory(
                v, use_rep="X_emb", n_neighbors=N_NEIGHBORS, resolution=RESOLUTION, seed=SEED, umap=p, copy=True, **g))
            rows.append({"embedding": method, "root": root, **pseudotime_score(traced), "dims": int(embedding.shape[1]),
                         "embed_seconds": seconds[method], "trajectory_seconds": trajectory_seconds})
            print(json.dumps(rows[-1]), file=sys.stderr)
            if plot:
                plot_trajectory(traced, Path(args.plots_dir) / f"trajectory_{method}.png", color=["true_time", "branch"],
                                title=method)
    return rows, not_run


# ------------------------------------------------------------------ report
def machine() -> str:
    libs = ", ".join(f"{name} {version(name)}" for name in ("torch", "scanpy", "anndata", "scikit-learn", "igraph",
                                                           "pynndescent", "umap-learn"))
    return (f"{platform.node()}, {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            f"{libs}")


def markdown(result: dict) -> str:
    lines = ["# Clustering and trajectories on each embedding", "",
             f"{result['date']}, {result['machine']}. One torch / BLAS / numba thread; other jobs may have shared "
             f"the cores, so times are indicative (1-minute load average {result['load_average_1min']['start']} at "
             f"the start, {result['load_average_1min']['end']} at the end). Total wall time "
             f"{result['total_seconds']:.0f} s.", "",
             f"Command: `{result['command']}`", "",
             "## Clustering against the labels", "",
             f"Leiden at resolution {RESOLUTION} (igraph's implementation), {N_NEIGHBORS} neighbours, seed {SEED}, on "
             "each embedding; ARI and NMI against the label column (scikit-learn). `pca`: 50 PCs of 2,000 "
             "log-normalised HVGs (seurat flavour). `scvi`: atlasformer's SCVIModel (n_latent 10, batch covariate "
             f"`batch`, same HVGs, {result['settings']['scvi_epochs']} epochs). `atlasformer_zeroshot`: "
             f"{result['settings']['model']}'s cell embedding, not fine-tuned. `atlasformer_integrated`: integration "
             "fine-tuning of that model at its default recipe (frozen backbone; 50 PCs of the expression path beside "
             "the embedding scaled to weight 0.1; Harmony over `batch`), without labels. Best ARI per dataset in "
             "bold.", "",
             "| dataset | embedding | ARI | NMI | clusters / labels | dims | embedding s | clustering s |",
             "|---|---|---|---|---|---|---|---|"]
    for dataset in DATASETS:
        rows = [r for r in result["clustering"] if r["dataset"] == dataset]
        best = max((r["ari"] for r in rows), default=None)
        for r in rows:
            ari = f"**{r['ari']:.3f}**" if r["ari"] == best else f"{r['ari']:.3f}"
            lines.append(f"| {dataset} ({r['n_cells']} cells) | {r['embedding']} | {ari} | {r['nmi']:.3f} | "
                         f"{r['n_clusters']} / {r['n_labels']} | {r['dims']} | {r['embed_seconds']} | "
                         f"{r['cluster_seconds']} |")
    sim = result["settings"]["simulation"]
    lines += ["", "## Pseudotime against the true time", "",
              f"simulate_trajectory({', '.join(f'{k}={v}' for k, v in sim.items())}): a trunk up to time 0.3, then two "
              "branches. Diffusion pseudotime (scanpy's DPT, 10 diffusion components) on each embedding, Spearman's "
              "rho with the true time over the cells with a finite pseudotime. Roots: `earliest_cell` is the cell "
              "with the smallest true time (the same cell for every embedding); `label_farthest` and "
              "`label_first_component` take the label `trunk` of obs['branch'] with each root rule of "
              "`trajectory` (root_true_time: the true time of the cell chosen; 0 is the start). "
              f"`atlasformer_sim_pretrained`: a 2-layer, width-64 model pretrained for "
              f"{result['settings']['pretrain_steps']} steps on these simulated cells, embedded zero-shot. "
              "`atlasformer_zeroshot_renamed`: the shipped model on the same counts with the genes renamed to a "
              "seeded sample of its vocabulary genes.", "",
              "| embedding | root | Spearman | root true time | finite | groups | dims | embedding s | trajectory s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["trajectory"]:
        lines.append(f"| {r['embedding']} | {r['root']} | {r['spearman']:.3f} | {r['root_true_time']:.3f} | "
                     f"{r['finite_fraction']:.2f} | {r['n_groups']} | {r['dims']} | {r['embed_seconds']} | "
                     f"{r['trajectory_seconds']} |")
    for method, why in result["not_run"].items():
        lines += ["", f"`{method}` did not run: {why}"]
    lines += ["", "## Notes", "", *[f"- {note}" for note in result["notes"]], ""]
    return "\n".join(lines)


def notes(result: dict) -> list[str]:
    """Observations computed from the numbers, so the text cannot drift from them."""
    out = []
    for dataset in DATASETS:
        rows = sorted((r for r in result["clustering"] if r["dataset"] == dataset), key=lambda r: -r["ari"])
        if rows:
            out.append(f"{dataset}: ARI ranking " + " > ".join(f"{r['embedding']} {r['ari']:.3f}" for r in rows) + ".")
    by = {(r["embedding"], r["root"]): r for r in result["trajectory"]}
    for method in dict.fromkeys(r["embedding"] for r in result["trajectory"]):
        far, first = by.get((method, "label_farthest")), by.get((method, "label_first_component"))
        if far and first:
            out.append(f"{method}: root from the label `trunk`: the farthest rule picked a cell at true time "
                       f"{far['root_true_time']:.2f} (Spearman {far['spearman']:.3f}), the first-component rule one at "
                       f"{first['root_true_time']:.2f} (Spearman {first['spearman']:.3f}).")
    out.append("The first neighbour search on 8,192 cells or more (kang_pbmc_8donors, `pca` first) includes "
               "compiling pynndescent (numba), once per process: most of that row's clustering time.")
    out.append("Leiden's resolution is fixed at 1.0 for every embedding: the number of clusters it finds depends on the "
               "embedding's scale and neighbourhood structure, so ARI here mixes how well an embedding separates the "
               "labels with how its graph suits resolution 1.0.")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="atlasformer-public-small")
    parser.add_argument("--scvi-epochs", type=int, default=50)
    parser.add_argument("--pretrain-steps", type=int, default=1000,
                        help="pretraining steps of the model trained on the simulated cells")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--plots-dir", default=None, help="also write UMAP figures here (not committed)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "cluster_trajectory"))
    args = parser.parse_args()

    import numba
    import scanpy as sc
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    threadpool_limits(1)
    sc.settings.n_jobs = 1
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    clustering = [row for name in args.datasets for row in clustering_rows(name, DATASETS[name], args)]
    trajectories, not_run = trajectory_rows(args)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "command": " ".join(["OMP_NUM_THREADS=1 python benchmarks/cluster_trajectory.py", *sys.argv[1:]]),
              "settings": {"model": args.model, "scvi_epochs": args.scvi_epochs, "pretrain_steps": args.pretrain_steps,
                           "resolution": RESOLUTION, "n_neighbors": N_NEIGHBORS, "seed": SEED, "threads": 1,
                           "simulation": SIMULATION},
              "clustering": clustering, "trajectory": trajectories, "not_run": not_run,
              "total_seconds": round(time.perf_counter() - start, 1),
              "load_average_1min": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)}}
    result["notes"] = notes(result)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
