"""File-level driver shared by every task: fit on an input file, write the annotated copy, the fine-tuned
model folder, metrics.json and plots into the output folder. Tasks plug in through their user-facing
class (``fit``, ``write_outputs``, ``save``, ``plots`` of :class:`~atlasformer.finetune.task.Task`), so no task
repeats this."""

from __future__ import annotations

from pathlib import Path

import torch

from atlasformer.checkpoints import refuse_foreign_model_folder
from atlasformer.tokenization import input_stem, read_h5ad
from atlasformer.tokenization.corpus_format import write_json_atomic
from atlasformer.tokenization.outputs import (
    prepare_output_folder,
    refuse_name_clashes,
    refuse_output_over_inputs,
)

from .common import gene_report, output_adata, write_h5ad_atomic
from .task import Task


def annotated_path(data: str | Path, output: str | Path) -> Path:
    """``<output>/<input stem>.h5ad``, refusing a path that is the input itself (inputs are never modified)."""
    path = Path(output) / f"{input_stem(data)}.h5ad"
    refuse_output_over_inputs([path], [data])
    return path


def annotated_name(data: str | Path) -> str:
    return f"{input_stem(data)}.h5ad"


def prepare_outputs(output: str | Path, data: list, *, reads: tuple = (), overwrite: bool = False,
                    command: str = "") -> Path:
    """Check ``output`` before any work: not over an input, ours or empty (or ``overwrite``), one file per input."""
    refuse_name_clashes(data, annotated_name)
    for path in data:
        annotated_path(path, output)
    return prepare_output_folder(output, [*data, *(r for r in reads if r)], overwrite=overwrite, command=command)


def launch_state(cpu: bool = False):
    """This process's place in a launch: accelerate's ``PartialState``, which the fit loop's engine joins too.

    Joined before fitting, so that tasks which run no training loop (a frozen backbone with a closed-form
    readout) also know their rank and can wait for rank 0.
    """
    from accelerate import PartialState

    return PartialState(cpu=cpu or not torch.cuda.is_available())


def finetune_file(task: Task, data: str | Path, output: str | Path, *, with_x: bool = False, run_config: dict | None = None,
                  extra_inputs: dict | None = None, queries: tuple = (), overwrite: bool = False) -> dict:
    """Fine-tune ``task`` on ``data`` and write ``<output>/{model/, <stem>.h5ad, metrics.json, *.png}``.

    The input is read into memory for training and never modified; outputs are written atomically. The
    output folder is checked first (:func:`prepare_outputs`), with the ``queries`` that will be predicted
    into it later: it may not hold an input and, without ``overwrite``, not hold files atlasformer did not write.
    Under a multi-process launch every rank fits, rank 0 alone writes, and the others wait until it is done
    (their summary lists no plots).
    """
    output = Path(output)
    paired = getattr(task, "paired", None)
    state = launch_state(getattr(getattr(task, "config", None), "cpu", False))
    with state.main_process_first():  # every rank checks; rank 0 creates the folder before the others look
        prepare_outputs(output, [data, *queries], reads=(paired if isinstance(paired, (str, Path)) else None,),
                        overwrite=overwrite, command="finetune")
        refuse_foreign_model_folder(output / "model", overwrite=overwrite)
    target_path = output / annotated_name(data)  # checked against the inputs by prepare_outputs
    adata = read_h5ad(data, backed=False)
    source = str(data)
    metrics = task.fit(adata, source=source, **(extra_inputs or {}))
    summary = {"input": source, "output": str(target_path), "model": str(output / "model"), "validation": metrics,
               "plots": []}
    if state.is_main_process:  # the ranks hold the same model: one writer, so none races another in a folder
        summary = write_fitted(task, adata, output, summary, run_config=run_config, with_x=with_x, overwrite=overwrite)
    state.wait_for_everyone()
    return summary


def write_fitted(task: Task, adata, output: Path, summary: dict, *, run_config: dict | None, with_x: bool,
                 overwrite: bool) -> dict:
    """Write a fitted task's model folder, annotated copy of ``adata``, plots and ``metrics.json`` (the summary,
    returned with its plots)."""
    source = summary["input"]
    task.save(output / "model", run_config={**(run_config or {}), "data": [source]}, overwrite=overwrite)
    target = output_adata(adata, with_x)
    task.write_outputs(adata, target, source=source)
    write_h5ad_atomic(target, summary["output"])
    summary = {**summary, "plots": [str(p) for p in task.plots(output)]}
    write_json_atomic(output / "metrics.json", summary, default=float)
    return summary


def predict_file(task: Task, data: str | Path, output: str | Path, *, with_x: bool = False) -> Path:
    """Apply a fitted ``task`` to ``data`` (read backed, in chunks) and write ``<output>/<stem>.h5ad``.

    Callers check the output folder first with :func:`prepare_outputs` (all inputs at once)."""
    target_path = annotated_path(data, output)
    adata = read_h5ad(data, backed=True)
    if getattr(task, "tokenizer", None) is not None:  # which genes the model knows and the file lacks
        gene_report(adata, task.tokenizer, gene_key=getattr(task, "gene_key", None), source=str(data))
    target = output_adata(adata, with_x)
    task.write_outputs(adata, target, source=str(data))
    return write_h5ad_atomic(target, target_path)
