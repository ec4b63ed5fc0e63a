"""Parity of atlasformer's scANVI with scvi-tools' SCANVI: label transfer to a held-out donor of kang_pbmc_8donors.

The largest batch is held out (BENCHMARKS.md section 5's first split): its labels are hidden ("Unknown") and both
models train on all cells, the held-out donor unlabelled, as scANVI is meant to be used. HVGs: 2,000 (seurat flavour)
chosen on the labelled cells (all 1,287 genes of kang_pbmc_8donors). Recipe, the same for both (scvi-tools'
recommended one): scVI (ZINB, n_latent 10, n_hidden 128, batch covariate, Adam lr 1e-3 / weight decay 1e-6 / eps
0.01, batches of 128, 10% validation, KL warm-up over 400 epochs) for ``--scvi-epochs``, then scANVI from its
weights for ``--scanvi-epochs`` (default scvi-tools': min(10, max(2, heuristic / 3))); ``--from-scratch`` trains
scANVI directly instead. Scored on the held-out cells whose label occurs among the labelled ones: accuracy and
macro-F1. Pass: our accuracy at most 0.03 below scvi-tools'.

    python benchmarks/scanvi_parity.py [--scvi-epochs 50] [--data ../shared/data/kang_pbmc_8donors.h5ad]

Writes benchmarks/results/scanvi_parity.md and .json and prints the JSON summary on its last line. Needs the
reference extra (``pip install 'atlasformer[reference]'``); without scvi-tools it says so and prints
``{"skipped": true, ...}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from atlasformer.finetune.baselines import log_normalize, select_hvgs
from atlasformer.finetune.metrics import classification_metrics
from atlasformer.finetune.vae_models import SCANVIModel, SCVIModel
from atlasformer.tokenization.anndata_io import to_csr

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "kang_pbmc_8donors.h5ad"
UNLABELLED = "Unknown"
LABEL_COLUMN = "_scanvi_parity_label"


def prepare(adata: ad.AnnData, labels_key: str, batch_key: str, holdout: str | None) -> tuple[ad.AnnData, np.ndarray]:
    """The HVG subset of ``adata`` with ``obs[LABEL_COLUMN]`` (held-out labels hidden) and the held-out mask."""
    batches = adata.obs[batch_key].astype(str)
    holdout = holdout or batches.value_counts().index[0]
    held = (batches == str(holdout)).to_numpy()
    if not held.any():
        raise SystemExit(f"--holdout {holdout!r} is not a value of obs[{batch_key!r}]: {sorted(set(batches))[:10]}")
    hvgs = select_hvgs(log_normalize(to_csr(adata.X[~held])), 2000)
    data = adata[:, hvgs].copy()
    data.obs[LABEL_COLUMN] = np.where(held, UNLABELLED, data.obs[labels_key].astype(str))
    return data, held


def train_ours(adata, batch_key, args):
    scanvi_options = {"labels_key": LABEL_COLUMN, "unlabeled_category": UNLABELLED, "epochs": args.scanvi_epochs}
    if args.from_scratch:
        model = SCANVIModel(batch_key=batch_key, seed=args.seed, **scanvi_options)
    else:
        scvi_model = SCVIModel(batch_key=batch_key, epochs=args.scvi_epochs, seed=args.seed)
        scvi_model.fit(adata)
        model = SCANVIModel.from_scvi_model(scvi_model, **scanvi_options)
    model.fit(adata)
    return model.predict(adata)


def train_reference(adata, batch_key, args):
    import scvi

    scvi.settings.seed = args.seed
    options = {"batch_size": 128, "train_size": 0.9, "accelerator": "cpu", "enable_progress_bar": False,
               "logger": False, "enable_checkpointing": False}
    if args.from_scratch:
        scvi.model.SCANVI.setup_anndata(adata, labels_key=LABEL_COLUMN, unlabeled_category=UNLABELLED,
                                        batch_key=batch_key)
        model = scvi.model.SCANVI(adata)  # defaults: n_latent 10, n_hidden 128, n_layers 1, dropout 0.1, zinb
    else:
        scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key, labels_key=LABEL_COLUMN)
        scvi_model = scvi.model.SCVI(adata)
        scvi_model.train(max_epochs=args.scvi_epochs, **options)
        model = scvi.model.SCANVI.from_scvi_model(scvi_model, unlabeled_category=UNLABELLED)
    model.train(max_epochs=args.scanvi_epochs, **options)
    return np.asarray(model.predict(adata)).astype(str)


def score(adata, held, predicted, labels_key) -> dict:
    truth = adata.obs[labels_key].astype(str).to_numpy()
    seen = set(truth[~held])
    test = held & np.isin(truth, list(seen))
    metrics = classification_metrics(truth[test], np.asarray(predicted)[test])
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "n_test": int(test.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--labels-key", default="cell_type")
    parser.add_argument("--batch-key", default="batch")
    parser.add_argument("--holdout", default=None, help="batch to hold out (default: the largest)")
    parser.add_argument("--scvi-epochs", type=int, default=None, help="scVI epochs (default scvi-tools' heuristic)")
    parser.add_argument("--scanvi-epochs", type=int, default=None, help="scANVI epochs (default scvi-tools')")
    parser.add_argument("--from-scratch", action="store_true", help="train scANVI without scVI pretraining")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "scanvi_parity"))
    args = parser.parse_args()
    if importlib.util.find_spec("scvi") is None:
        reason = "scvi-tools is not installed; install the reference extra: pip install 'atlasformer[reference]'"
        print(f"scanvi_parity: skipped: {reason}", file=sys.stderr)
        print(json.dumps({"skipped": True, "reason": reason}))
        return
    torch.set_num_threads(args.threads)

    adata, held = prepare(ad.read_h5ad(args.data), args.labels_key, args.batch_key, args.holdout)
    start = time.perf_counter()
    ours = score(adata, held, train_ours(adata.copy(), args.batch_key, args), args.labels_key)
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    reference = score(adata, held, train_reference(adata.copy(), args.batch_key, args), args.labels_key)
    reference_seconds = time.perf_counter() - start

    holdout = adata.obs[args.batch_key].astype(str).to_numpy()[held][0]
    summary = {"holdout": holdout, "n_test": ours["n_test"], "n_genes": int(adata.n_vars),
               "recipe": "scratch" if args.from_scratch else "scvi_then_scanvi", "scvi_epochs": args.scvi_epochs,
               "scanvi_epochs": args.scanvi_epochs,
               "accuracy_ours": round(ours["accuracy"], 4), "accuracy_scvi_tools": round(reference["accuracy"], 4),
               "macro_f1_ours": round(ours["macro_f1"], 4), "macro_f1_scvi_tools": round(reference["macro_f1"], 4),
               "accuracy_diff": round(ours["accuracy"] - reference["accuracy"], 4),
               "train_seconds_ours": round(ours_seconds, 1), "train_seconds_scvi_tools": round(reference_seconds, 1),
               "passed": bool(ours["accuracy"] >= reference["accuracy"] - 0.03)}
    write_results(Path(args.output), summary, args)
    print(json.dumps(summary))


def write_results(output: Path, summary: dict, args) -> None:
    import scvi

    output.parent.mkdir(parents=True, exist_ok=True)
    machine = (f"{platform.node()}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"scvi-tools {scvi.__version__}")
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine,
              "note": "other agents' jobs shared the cores during the run; times are indicative",
              "data": str(args.data), "seed": args.seed, "summary": summary}
    output.with_suffix(".json").write_text(json.dumps(record, indent=2))
    epochs = "default" if summary["scanvi_epochs"] is None else summary["scanvi_epochs"]
    recipe = (f"scANVI from scratch, {epochs} epochs" if args.from_scratch else
              f"scVI {summary['scvi_epochs'] or 'default'} epochs, then scANVI from it ({epochs} epochs)")
    lines = ["# scANVI parity with scvi-tools", "", f"{record['date']}, {machine}. {record['note']}.", "",
             f"{Path(args.data).stem}, donor {summary['holdout']} held out (labels hidden, {summary['n_test']} test "
             f"cells), {summary['n_genes']} HVGs, {recipe}, the same for both.", "",
             "| | atlasformer scANVI | scvi-tools SCANVI | difference | target |", "|---|---|---|---|---|",
             f"| held-out accuracy | {summary['accuracy_ours']} | {summary['accuracy_scvi_tools']} "
             f"| {summary['accuracy_diff']:+.4f} | at least -0.03 |",
             f"| held-out macro-F1 | {summary['macro_f1_ours']} | {summary['macro_f1_scvi_tools']} | | |",
             f"| training time (s) | {summary['train_seconds_ours']} | {summary['train_seconds_scvi_tools']} | | |",
             "", f"Parity {'passed' if summary['passed'] else 'FAILED'}.", ""]
    output.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
