"""What pretraining buys per unit of compute: held-out masked loss and kang annotation from the embedding, per run.

Each point pretrains ``configs/pretrain/public_small.yaml`` (the shipped model's recipe) with a few overrides
(a step budget or a model shape) on the public human RNA corpus, through the ``atlasformer pretrain`` command,
then scores the result on kang annotation (the 3 largest donors held out, seed 0) with two methods of
``atlasformer benchmark`` that see only the pretrained embedding:

* ``atlasformer_zeroshot``: kNN on the frozen embedding;
* ``atlasformer_no_expression``: the annotation recipe's logistic readout on the frozen embedding alone.

Compute is counted as training FLOPs on non-pad tokens (``flops_seen`` in the run's metrics, from
``model_zoo.cell_transformer.training_flops``), which does not depend on machine load; wall time is reported
beside it with the thread count. Points already in the JSON are kept (delete a point's entry to rerun it).

Usage: python benchmarks/pretraining_curve.py [--points steps-1000 steps-2000 ...] [--reuse steps-4000=RUN_DIR]
       python benchmarks/pretraining_curve.py --reread-probes [--reprobe POINT=MODEL_DIR ...]  (stored points only)
Results go to benchmarks/results/pretraining_curve.{md,json}; runs to benchmarks/checkpoints/curve/<point>/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from atlasformer.finetune.benchmark_report import machine_line

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = ROOT / "configs/pretrain/public_small.yaml"
CORPUS = ("kang_pbmc_8donors", "cellbench_lung_lines_5batches", "pbmc_10x_3chemistries", "pbmc4k_10x_v2",
          "pbmc_sorted_reference", "pbmc_donorA_query", "kang_pbmc_ctrl_stim", "pbmc_celltypist_sample",
          "pbmc1k_cite.rna", "eccite_pbmc_500.rna")  # the shipped model's corpus (scripts/build_public_model.sh)
# point -> overrides of the shipped recipe (4 layers, width 64, 256 genes per cell, 4,000 steps of 32 cells)
WIDTH_128 = ["model.d_model=128", "model.d_ff=512"]
POINTS = {
    "steps-1000": ["max_steps=1000"],
    "steps-2000": ["max_steps=2000"],
    "steps-4000": [],
    "steps-8000": ["max_steps=8000"],
    # other shapes at about the compute of steps-2000 to steps-4000 (FLOPs per step grow with width, depth, length)
    "width-128-steps-1000": [*WIDTH_128, "max_steps=1000"],
    "layers-8-steps-1500": ["model.n_layers=8", "max_steps=1500"],
    "genes-512-steps-1500": ["tokenizer.max_seq_len=512", "max_steps=1500"],
    "width-128-steps-2000": [*WIDTH_128, "max_steps=2000"],  # the candidate next public model (float16 weights)
    # the same with a vocabulary of genes that are a token in >= 5 corpus cells (9,931 of 26,447): fp32 under 10 MiB
    "width-128-steps-2000-token-vocab": [*WIDTH_128, "max_steps=2000", "vocab_min_token_cells=5"],
}
AF = str(Path(sys.executable).with_name("atlasformer"))  # the console script of this environment
PROBES = ("atlasformer_zeroshot", "atlasformer_no_expression")


def final_metrics(run_dir: Path) -> dict:
    """The last eval line of a finished run's metrics.jsonl, and its training compute."""
    evals, rates = {}, []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval/loss" in row:
            evals = row
        elif row.get("cells_per_s"):
            rates.append(row["tokens_per_s"] / row["cells_per_s"])
    tokens_per_cell = sum(rates) / len(rates)  # non-pad tokens per cell, from the logged rates
    return {"step": evals.get("step"), "eval_loss": evals.get("eval/loss"),
            "eval_masked_value": evals.get("eval/masked_value"), "eval_mvc": evals.get("eval/mvc"),
            "tokens_per_cell": tokens_per_cell, "flops": training_compute(run_dir, evals["step"], tokens_per_cell)}


def training_compute(run_dir: Path, steps: int, tokens_per_cell: float) -> float:
    """Training FLOPs of the run: ``training_flops`` of one step of cells of the mean length, times the steps."""
    import torch

    from atlasformer.model_zoo import CellTransformerConfig
    from atlasformer.model_zoo.cell_transformer import training_flops

    config = CellTransformerConfig.from_pretrained(run_dir / "model")
    batch = json.loads((run_dir / "config.json").read_text())["batch_size"]
    return steps * training_flops(config, torch.full((batch,), round(tokens_per_cell)))


def pretrain(point: str, run_dir: Path, data: Path, threads: int) -> float:
    """Pretrain one point into ``run_dir``; returns the wall time in seconds."""
    files = [str(data / f"{name}.h5ad") for name in CORPUS]
    cmd = [AF, "pretrain", "--data", *files, "--output", str(run_dir),
           "--config", str(CONFIG), f"threads={threads}", *POINTS[point]]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return time.perf_counter() - start


def probe(model_dir: Path, data: Path, out: Path, threads: int) -> dict:
    """Kang annotation (seed 0) from the embedding alone: {method: {metric: value}}, each the mean over the
    held-out donors."""
    cmd = [AF, "benchmark", "--task", "annotation",
           "--data", str(data / "kang_pbmc_8donors.h5ad"), "--labels-key", "cell_type", "--batch-key", "batch",
           "--methods", *PROBES, "--model", str(model_dir), "--seeds", "0", "--output", str(out), f"threads={threads}"]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stdout=subprocess.DEVNULL)
    return read_probe(out)


PROBE_SCOPE = "mean over the held-out donors"


LEGACY_FOLD = "1488"  # the last held-out donor: the probe figure the script read before 2026-12-06


def read_probe(out: Path, fold: str | None = None) -> dict:
    """{method: {metric: value}} of a probe's results.json: the rows over all held-out donors, or one donor's
    (``fold``)."""
    scores: dict = {}
    for row in json.loads((out / "results.json").read_text()):
        if row.get("fold") == fold:
            scores.setdefault(row["method"], {})[row["metric"]] = row["value"]
    return scores


def parameter_count(model_dir: Path) -> int:
    from safetensors.torch import load_file
    return sum(t.numel() for t in load_file(str(model_dir / "model.safetensors")).values())


def write_markdown(record: dict, path: Path) -> None:
    lines = ["# Pretraining curve: held-out loss and kang annotation from the embedding against compute", "",
             f"- date: {record['date']}; machine: {record['machine']}",
             f"- recipe: `{CONFIG.relative_to(ROOT)}` (4 layers, width 64, 256 genes per cell, 32 cells per step, "
             "cosine schedule to max_steps) with the overrides below, on the shipped model's corpus "
             f"({len(CORPUS)} human RNA files of ../shared/data); {record['threads']} torch thread(s) per run",
             "- probes: kang annotation, 3 largest donors held out one at a time, seed 0, from the frozen embedding "
             "alone (kNN: `atlasformer_zeroshot`; logistic readout: `atlasformer_no_expression`)",
             "- held-out loss is masked-value + MVC on the same 5% of corpus cells; it compares runs with the same "
             "genes per cell and objectives only", "",
             "| point | overrides | parameters | steps | training TFLOPs | wall time (min) | held-out loss | "
             "masked value | MVC | kNN accuracy | kNN macro-F1 | logistic accuracy | logistic macro-F1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    one_fold = []
    for name, p in record["points"].items():
        knn, lin = p["probes"].get("atlasformer_zeroshot", {}), p["probes"].get("atlasformer_no_expression", {})
        starred = p.get("probe_scope") != PROBE_SCOPE
        one_fold += [name] if starred else []
        lines.append(
            f"| {name}{' *' if starred else ''} | {' '.join(POINTS.get(name, [])) or '(shipped recipe)'} | {p['parameters']:,} | {p['step']} | "
            f"{(p['flops'] or 0) / 1e12:.1f} | {p['wall_s'] / 60:.1f} | {p['eval_loss']:.2f} | "
            f"{p['eval_masked_value']:.3f} | {p['eval_mvc']:.2f} | {knn.get('accuracy', float('nan')):.4f} | "
            f"{knn.get('macro_f1', float('nan')):.4f} | {lin.get('accuracy', float('nan')):.4f} | "
            f"{lin.get('macro_f1', float('nan')):.4f} |")
    if one_fold:
        lines += ["", "\\* Probe columns of donor 1488's fold alone (the last of the three held-out donors): before "
                  "2026-12-06 the script read the last fold's row instead of the mean over the donors, and these "
                  "points' probe folders were not kept, so they could not be re-read (`--reread-probes`). They compare "
                  "with each other, not with the other rows."]
        lines += [""] + [f"- On that fold, {name}: kNN {f['atlasformer_zeroshot']['accuracy']:.4f} / "
                  f"{f['atlasformer_zeroshot']['macro_f1']:.4f}, logistic {f['atlasformer_no_expression']['accuracy']:.4f} / "
                  f"{f['atlasformer_no_expression']['macro_f1']:.4f} (accuracy / macro-F1)."
                  for name, p in record["points"].items() if (f := p.get(f"probes_donor_{LEGACY_FOLD}"))]
    lines += ["", f"Command: `python benchmarks/pretraining_curve.py --points {' '.join(record['points'])} "
              "--reuse steps-4000=benchmarks/checkpoints/public-small --wall-s steps-4000=1976` (steps-4000 is the "
              "shipped model's own run; its wall time is from its model card, measured alone). width-128-steps-2000 "
              "was pretrained at 2 threads (`--threads 2`), partly beside other jobs, and probed with "
              "`--reuse width-128-steps-2000=RUN_DIR --wall-s width-128-steps-2000=1743 --threads 2`. Probe columns "
              "re-read from the kept probe folders, and steps-4000 probed again from the shipped folder: `python "
              "benchmarks/pretraining_curve.py --reread-probes --reprobe "
              "steps-4000=checkpoints/pretrained/atlasformer-public-small`", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS))
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=Path, default=HERE / "checkpoints/curve")
    parser.add_argument("--results", type=Path, default=HERE / "results/pretraining_curve")
    parser.add_argument("--reuse", nargs="*", default=[], metavar="POINT=RUN_DIR",
                        help="a finished run of that point's recipe (e.g. the shipped model's run folder)")
    parser.add_argument("--wall-s", nargs="*", default=[], metavar="POINT=SECONDS",
                        help="wall time of a reused run (its own record, e.g. the model card's)")
    parser.add_argument("--refresh", action="store_true",
                        help="recompute the loss and compute columns of stored points from their run folders")
    parser.add_argument("--reread-probes", action="store_true",
                        help="read the probe columns of stored points again from their kept probe folders")
    parser.add_argument("--reprobe", nargs="*", default=[], metavar="POINT=MODEL_DIR",
                        help="probe stored points again from these model folders (e.g. the shipped one)")
    args = parser.parse_args(argv)
    reused = dict(item.split("=", 1) for item in args.reuse)
    walls = {k: float(v) for k, v in (item.split("=", 1) for item in args.wall_s)}
    json_path = args.results.with_suffix(".json")
    record = json.loads(json_path.read_text()) if json_path.exists() else {"points": {}}
    record.update(date=time.strftime("%Y-%m-%dT%H:%M:%S"), machine=machine_line(), threads=args.threads)
    if args.refresh:
        for point, entry in record["points"].items():
            entry.update(final_metrics(Path(entry.get("run_dir") or reused.get(point) or args.runs / point)))
    reprobe = dict(item.split("=", 1) for item in args.reprobe)
    for point, entry in record["points"].items():
        folder = args.runs / f"{point}-probe"
        if point in reprobe:
            probe(Path(reprobe[point]), args.data, folder, args.threads)
        if point in reprobe or (args.reread_probes and (folder / "results.json").exists()):
            entry.update(probes=read_probe(folder), probe_scope=PROBE_SCOPE,
                         **{f"probes_donor_{LEGACY_FOLD}": read_probe(folder, LEGACY_FOLD)})
    stored_only = args.refresh or args.reread_probes or reprobe
    if stored_only:
        json_path.write_text(json.dumps(record, indent=2))
        write_markdown(record, args.results.with_suffix(".md"))
    for point in ([] if stored_only else args.points):  # --refresh / --reread-probes / --reprobe train nothing
        if point in record["points"]:
            print(f"{point}: already measured, kept")
            continue
        run_dir = Path(reused[point]) if point in reused else args.runs / point
        wall = walls.get(point, float("nan"))
        if point not in reused:
            wall = pretrain(point, run_dir, args.data, args.threads)
        scores = probe(run_dir / "model", args.data, args.runs / f"{point}-probe", args.threads)
        result = {**final_metrics(run_dir), "run_dir": str(run_dir), "wall_s": wall, "probes": scores,
                  "probe_scope": PROBE_SCOPE, "parameters": parameter_count(run_dir / "model")}
        print(point, json.dumps(result))
        # read again before writing: another invocation may have added points meanwhile
        record["points"] = {**(json.loads(json_path.read_text())["points"] if json_path.exists() else {}),
                            point: result}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(record, indent=2))
        write_markdown(record, args.results.with_suffix(".md"))
    summary = {name: {"eval_loss": p["eval_loss"], "tflops": (p["flops"] or 0) / 1e12,
                      "knn_accuracy": p["probes"].get("atlasformer_zeroshot", {}).get("accuracy"),
                      "logistic_accuracy": p["probes"].get("atlasformer_no_expression", {}).get("accuracy")}
               for name, p in record["points"].items()}
    print(json.dumps(summary))  # the last line: one JSON object (FORMATS.md)


if __name__ == "__main__":
    main()
