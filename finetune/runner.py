"""File-level driver shared by every task: fit on an input file, write the annotated copy, the fine-tuned
model folder, metrics.json and plots into the output folder. Tasks plug in through their user-facing
class (``fit``, ``write_outputs``, ``save``, ``plots``), so no task repeats this."""

from __future__ import annotations

import json
from pathlib import Path

from atlasformer.tokenization import InputError, input_stem, read_h5ad

from .common import gene_report, output_adata, write_h5ad_atomic


def annotated_path(data: str | Path, output: str | Path) -> Path:
    """``<output>/<input stem>.h5ad``, refusing a path that is the input itself (inputs are never modified)."""
    path = Path(output) / f"{input_stem(data)}.h5ad"
    if path.resolve() == Path(data).resolve():
        raise InputError(f"{data}: the output {path} would overwrite this input; choose another --output folder.")
    return path


def finetune_file(task, data: str | Path, output: str | Path, *, with_x: bool = False, run_config: dict | None = None,
                  extra_inputs: dict | None = None) -> dict:
    """Fine-tune ``task`` on ``data`` and write ``<output>/{model/, <stem>.h5ad, metrics.json, *.png}``.

    The input is read into memory for training and never modified; outputs are written atomically.
    """
    output = Path(output)
    target_path = annotated_path(data, output)
    output.mkdir(parents=True, exist_ok=True)
    adata = read_h5ad(data, backed=False)
    source = str(data)
    metrics = task.fit(adata, source=source, **(extra_inputs or {}))
    task.save(output / "model", run_config=run_config)
    target = output_adata(adata, with_x)
    task.write_outputs(adata, target, source=source)
    written = write_h5ad_atomic(target, target_path)
    plots = task.plots(output)
    summary = {"input": source, "output": str(written), "model": str(output / "model"), "validation": metrics,
               "plots": [str(p) for p in plots]}
    (output / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def predict_file(task, data: str | Path, output: str | Path, *, with_x: bool = False) -> Path:
    """Apply a fitted ``task`` to ``data`` (read backed, in chunks) and write ``<output>/<stem>.h5ad``."""
    target_path = annotated_path(data, output)
    adata = read_h5ad(data, backed=True)
    if getattr(task, "tokenizer", None) is not None:  # which genes the model knows and the file lacks
        gene_report(adata, task.tokenizer, gene_key=getattr(task, "gene_key", None), source=str(data))
    target = output_adata(adata, with_x)
    task.write_outputs(adata, target, source=str(data))
    return write_h5ad_atomic(target, target_path)
