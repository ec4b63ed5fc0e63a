"""Copy a pretraining run's model into the package as atlasformer-public-small, with a model card that states the
corpus, steps, compute and held-out loss.

    python scripts/ship_model.py runs/public-small checkpoints/pretrained/atlasformer-public-small [SECONDS THREADS [DTYPE]]

The run folder holds ``model/`` and ``metrics.jsonl`` (written by ``atlasformer pretrain``). Corpus files are
named without their local folders, so the card holds no path of this machine. ``DTYPE`` float16 stores the
weights in 16 bits (default float32): the shipped folder must stay under 10 MiB, and a 4.3M-parameter model (width
128) is 17 MB in float32. Loading casts them back to float32 (``load_state_dict`` copies into the float32
parameters), so a user computes in float32; ``scripts/compare_weights.py`` compares a rebuilt run after the same
rounding. float16 keeps 10 bits of mantissa, bfloat16 only 7.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from atlasformer.checkpoints import export_model_folder, load_model_folder
from atlasformer.model_zoo.cell_transformer import training_flops

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def held_out_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}


def training_tflops(run: Path, model) -> float | None:
    """Training compute of the run, in TFLOPs: ``training_flops`` of a step of cells of the logged mean length
    (non-pad tokens per cell, from the logged rates; heads at every token, as the pretraining curve counts)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] / r["cells_per_s"] for r in rows if r.get("cells_per_s")]
    if not rates:
        return None  # a run that logged no rates
    steps = max(r["step"] for r in rows)
    batch = json.loads((run / "model" / "atlasformer.json").read_text())["run_config"]["batch_size"]
    cell = torch.full((batch,), round(sum(rates) / len(rates)))
    return steps * training_flops(model.config, cell) / 1e12


def ship(run: Path, target: Path, seconds: float | None = None, threads: int | None = None,
         dtype: str = "float32") -> Path:
    model, tokenizer = load_model_folder(run / "model")
    model = model.to(DTYPES[dtype])
    manifest = json.loads((run / "model" / "atlasformer.json").read_text())
    run_config = dict(manifest["run_config"])
    run_config["data"] = [Path(p).name for p in run_config.get("data", [])]
    run_config.pop("output", None)
    losses = held_out_losses(run)
    summary = {f"held-out loss at step {step}": loss for step, loss in sorted(losses.items())}
    summary["cells per step"] = run_config.get("batch_size")
    if (tflops := training_tflops(run, model)) is not None:
        summary["training compute (TFLOPs)"] = tflops
    if seconds is not None:
        summary["pretraining wall time (s)"] = seconds
        summary["CPU threads"] = threads
    if dtype != "float32":
        summary["stored weights"] = f"{dtype} (loaded as float32)"
    return export_model_folder(model, tokenizer, target, run_config, summary)


if __name__ == "__main__":
    args = sys.argv[1:]
    seconds = float(args[2]) if len(args) > 2 else None
    threads = int(args[3]) if len(args) > 3 else None
    print(ship(Path(args[0]), Path(args[1]), seconds, threads, *args[4:5]))
