"""Parity of atlasformer's scVI with scvi-tools' SCVI on kang_pbmc_8donors (same settings and epochs).

Both models: ZINB, n_latent 10, n_hidden 128, one layer, dropout 0.1, batch covariate, all 1,287 genes,
Adam lr 1e-3 / weight decay 1e-6 / eps 0.01, batches of 128, 10% validation, KL warm-up over 400 epochs,
the same number of epochs. Cells are split 90 / 10 (seeded); both train on the 90% and are scored on the
held-out 10%: mean per-cell reconstruction loss (-log p(x | z), z ~ q(z | x)). Integration: the latents of
all cells scored together by scib-metrics (BENCHMARKS.md section 2). Pass: reconstruction within 5% and
total within 0.03.

    python benchmarks/scvi_parity.py [--epochs 400] [--data ../shared/data/kang_pbmc_8donors.h5ad]

Writes benchmarks/results/scvi_parity.md and .json and prints the JSON summary on its last line. Needs the
reference extra (``pip install 'atlasformer[reference]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from atlasformer.finetune.baselines import RNAFeatures
from atlasformer.finetune.metrics import scib_scores
from atlasformer.finetune.vae_models import SCVIModel
from atlasformer.tokenization.anndata_io import to_csr

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "kang_pbmc_8donors.h5ad"


def train_ours(adata, epochs, seed):
    model = SCVIModel(batch_key="batch", epochs=epochs, seed=seed)
    model.fit(adata)
    return model


def train_reference(adata, epochs, seed):
    import scvi

    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata)  # defaults: n_latent 10, n_hidden 128, n_layers 1, dropout 0.1, zinb
    model.train(max_epochs=epochs, batch_size=128, train_size=0.9, accelerator="cpu", enable_progress_bar=False,
                logger=False, enable_checkpointing=False)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--epochs", type=int, default=400, help="epochs for both (scvi-tools' default here: 400)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "scvi_parity"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    adata = ad.read_h5ad(args.data)
    perm = np.random.default_rng(args.seed).permutation(adata.n_obs)
    n_held = adata.n_obs // 10
    held, train = np.sort(perm[:n_held]), np.sort(perm[n_held:])
    train_data, held_data = adata[train].copy(), adata[held].copy()

    start = time.perf_counter()
    ours = train_ours(train_data, args.epochs, args.seed)
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    reference = train_reference(train_data.copy(), args.epochs, args.seed)
    reference_seconds = time.perf_counter() - start

    recon_ours = ours.reconstruction_loss(held_data)
    reference_held = held_data.copy()
    recon_ref = float(reference.get_reconstruction_error(reference_held)["reconstruction_loss"])
    everything = adata.copy()
    embeddings = {"atlasformer_scvi": ours.embed(everything), "scvi_tools": reference.get_latent_representation(everything)}
    counts = to_csr(adata.X)
    pcs = RNAFeatures.fit(counts, seed=args.seed).pcs(counts)
    scores = scib_scores(embeddings, adata.obs["batch"], adata.obs["cell_type"], pre_integrated=pcs)["methods"]

    rel = abs(recon_ours - recon_ref) / recon_ref
    total_diff = abs(scores["atlasformer_scvi"]["total"] - scores["scvi_tools"]["total"])
    summary = {"epochs": args.epochs, "reconstruction_ours": round(recon_ours, 3), "reconstruction_scvi_tools": round(recon_ref, 3),
               "reconstruction_rel_diff": round(rel, 4), "total_ours": round(scores["atlasformer_scvi"]["total"], 4),
               "total_scvi_tools": round(scores["scvi_tools"]["total"], 4), "total_diff": round(total_diff, 4),
               "train_seconds_ours": round(ours_seconds, 1), "train_seconds_scvi_tools": round(reference_seconds, 1),
               "passed": bool(rel <= 0.05 and total_diff <= 0.03)}
    write_results(Path(args.output), summary, scores, args)
    print(json.dumps(summary))


def write_results(output: Path, summary: dict, scores: dict, args) -> None:
    import scvi

    output.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.node()}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, scvi-tools {scvi.__version__}"
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine,
              "note": "other agents' jobs shared the 2 cores during the run; times are indicative",
              "data": str(args.data), "seed": args.seed, "summary": summary, "scib": scores}
    output.with_suffix(".json").write_text(json.dumps(record, indent=2))
    lines = ["# scVI parity with scvi-tools", "", f"{record['date']}, {machine}. {record['note']}.", "",
             f"kang_pbmc_8donors, 90/10 split (seed {args.seed}), {args.epochs} epochs for both, scvi-tools defaults "
             "(ZINB, n_latent 10, n_hidden 128, batch covariate, KL warm-up 400 epochs).", "",
             "| | atlasformer scVI | scvi-tools SCVI | difference | target |", "|---|---|---|---|---|",
             f"| held-out reconstruction loss per cell | {summary['reconstruction_ours']} | {summary['reconstruction_scvi_tools']} "
             f"| {100 * summary['reconstruction_rel_diff']:.2f}% | within 5% |",
             f"| scib total | {summary['total_ours']} | {summary['total_scvi_tools']} | {summary['total_diff']} | within 0.03 |",
             f"| bio conservation | {scores['atlasformer_scvi']['bio_conservation']:.4f} | {scores['scvi_tools']['bio_conservation']:.4f} | | |",
             f"| batch correction | {scores['atlasformer_scvi']['batch_correction']:.4f} | {scores['scvi_tools']['batch_correction']:.4f} | | |",
             f"| training time (s) | {summary['train_seconds_ours']} | {summary['train_seconds_scvi_tools']} | | |",
             "", f"Parity {'passed' if summary['passed'] else 'FAILED'}.", ""]
    output.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
