"""Copy a pretraining run's model into the package as atlasformer-public-small, with a model card that states the
corpus, steps, compute and held-out loss.

    python scripts/ship_model.py runs/public-small model_zoo/pretrained/atlasformer-public-small [SECONDS THREADS]

The run folder holds ``model/`` and ``metrics.jsonl`` (written by ``atlasformer pretrain``). Corpus files are
named without their local folders, so the card holds no path of this machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from atlasformer.pretrain.export import export_model_folder, load_model_folder


def held_out_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}


def ship(run: Path, target: Path, seconds: float | None = None, threads: int | None = None) -> Path:
    model, tokenizer = load_model_folder(run / "model")
    manifest = json.loads((run / "model" / "atlasformer.json").read_text())
    run_config = dict(manifest["run_config"])
    run_config["data"] = [Path(p).name for p in run_config.get("data", [])]
    run_config.pop("output", None)
    losses = held_out_losses(run)
    summary = {f"held-out loss at step {step}": loss for step, loss in sorted(losses.items())}
    summary["cells per step"] = run_config.get("batch_size")
    if seconds is not None:
        summary["pretraining wall time (s)"] = seconds
        summary["CPU threads"] = threads
    return export_model_folder(model, tokenizer, target, run_config, summary)


if __name__ == "__main__":
    args = sys.argv[1:]
    seconds = float(args[2]) if len(args) > 2 else None
    threads = int(args[3]) if len(args) > 3 else None
    print(ship(Path(args[0]), Path(args[1]), seconds, threads))
