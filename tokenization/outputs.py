"""Output folders: a command never writes over its inputs and never deletes or replaces what it did not write.

Every command that writes a folder checks it with :func:`prepare_output_folder` before any work:

* no output path may be an input, or a folder that holds one (``--output`` is the data file, its folder, or
  a parent of a source checkpoint);
* an existing, non-empty folder is written into only when atlasformer wrote it (it holds the marker
  :data:`MARKER`, or is a model folder with its ``atlasformer.json`` manifest), or when the user passes
  ``--overwrite`` (``overwrite=True``);
* two inputs that would be written to the same ``<output>/<stem>.h5ad`` are refused up front.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .anndata_io import InputError

MARKER = ".atlasformer-output"
"""File written into every output folder a command creates, so a later run knows the folder is its own."""
MODEL_MANIFEST = "atlasformer.json"


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def refuse_output_over_inputs(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike]) -> None:
    """Raise :class:`InputError` when an output path is an input or a folder that holds one."""
    inputs = [(str(i), _resolved(i)) for i in inputs if i is not None]
    for out in outputs:
        target = _resolved(out)
        for shown, source in inputs:
            if target == source:
                raise InputError(f"{out}: this output path is the input {shown}, which would be overwritten; "
                                 "inputs are never modified, so choose another --output.")
            if target in source.parents:
                raise InputError(f"{out}: this output folder holds the input {shown}; choose an --output folder "
                                 "outside the inputs (inputs are never modified or deleted).")


def is_ours(folder: str | os.PathLike) -> bool:
    """Whether atlasformer wrote ``folder``: it holds the output marker or a model folder's manifest."""
    folder = Path(folder)
    return (folder / MARKER).is_file() or (folder / MODEL_MANIFEST).is_file()


def refuse_foreign_folder(folder: str | os.PathLike, *, overwrite: bool = False, what: str = "--output") -> None:
    """Raise :class:`InputError` when ``folder`` exists, is not empty and was not written by atlasformer."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: {what} must be a folder, and this is a file; choose a folder path.")
    if overwrite or not folder.is_dir():
        return
    entries = sorted(p.name for p in folder.iterdir())
    # the marker is looked for after listing: another rank of a launch may write it in between, and its folder
    # (holding only the marker) is then ours, not foreign
    if entries and not is_ours(folder):
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise InputError(f"{folder}: {what} already holds files atlasformer did not write ({shown}); choose a new or "
                         "empty folder, or pass --overwrite (overwrite=True) to write into it anyway (files of the "
                         "same names are replaced).")


def prepare_output_folder(output: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *,
                          overwrite: bool = False, command: str = "") -> Path:
    """Check ``output`` against the rules above, create it and mark it as written by atlasformer.

    Parameters
    ----------
    output
        The folder the command writes into.
    inputs
        Every file or folder the command reads (data, paired files, source checkpoints).
    overwrite
        Write into a non-empty folder that atlasformer did not write (never over an input).
    command
        Recorded in the marker, for the reader of the folder.

    Returns
    -------
    The output folder, created.
    """
    output = Path(output)
    inputs = list(inputs)
    refuse_output_over_inputs([output], inputs)
    refuse_foreign_folder(output, overwrite=overwrite)
    output.mkdir(parents=True, exist_ok=True)
    if not (output / MARKER).exists():  # written in place, not renamed: a temporary beside it would look foreign
        (output / MARKER).write_text(json.dumps({"written_by": "atlasformer", "command": command}) + "\n")
    return output


def refuse_name_clashes(paths: Iterable[str | os.PathLike], output_name) -> None:
    """Raise :class:`InputError` when two inputs map to the same output name (``output_name(path)``)."""
    seen: dict[str, str] = {}
    for path in paths:
        name = output_name(path)
        if name in seen and _resolved(seen[name]) != _resolved(path):
            raise InputError(f"{seen[name]} and {path} would both be written to {name} in --output; rename one, "
                             "or run them into separate --output folders.")
        seen[name] = str(path)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` (its folder created) for the block to write; renamed over ``path`` when
    the block succeeds and removed when it fails, so a reader never sees half a file and a failed write leaves
    the old file as it was. Every output file of atlasformer is written through it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_csv_atomic(frame, path: str | os.PathLike) -> Path:
    """Write a pandas DataFrame as CSV (no index) through :func:`atomic_path`. Returns the path."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)
