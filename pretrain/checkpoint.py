"""Training-state checkpoints: ``<run_dir>/checkpoints/step-<N>/`` written atomically, found by marker.

A checkpoint holds the model and optimizer state in the engine's format (``model.safetensors`` +
``optimizer.pt`` for ddp; sharded safetensors under ``sharded/`` for fsdp; DeepSpeed's ZeRO files
under ``deepspeed/``), the scheduler state, every rank's RNG state and data position, and the resolved
config. Pickled files are only ever read weights-only (:func:`~atlasformer.checkpoints.load_weights_only`).
It is written into a temporary folder and renamed; ``checksums.json`` (size and SHA-256 of every other
file) and then the ``COMPLETE`` marker are the last files written, and only folders holding the marker
are ever resumed from. A resume checks the files against ``checksums.json`` first and falls back to
the previous complete checkpoint when one is damaged. The trainer state records the model's
architecture, so a resume with other data or another model shape is refused by name. The newest
``keep_last`` complete checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from atlasformer.checkpoints import CheckpointError, load_safetensors, load_weights_only, sha256
from atlasformer.tokenization import InputError

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
CHECKSUMS = "checksums.json"
"""Size and SHA-256 of every other file of a checkpoint, written just before the marker."""
CHECKPOINT_FIX = "delete its checkpoint folder to resume from the previous one, or start a new --output"
ARCHITECTURE_FIELDS = ("vocab_size", "n_conditions", "d_model", "n_layers", "n_heads", "d_ff", "n_bins",
                       "value_encoding", "value_head", "gene_head", "mvc_head", "max_position_embeddings")
"""Model config fields that fix the shapes of the weights: a resume must build the same ones."""
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every checkpoint folder holding the marker, newest step first; half-written folders are ignored."""
    root = checkpoint_dir(run_dir)
    if not root.exists():
        return []
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / MARKER).exists()]
    return [path for _, path in sorted(steps, reverse=True)]


def latest_checkpoint(run_dir: str | Path, *, verify: bool = False, log=logger.warning) -> Path | None:
    """The complete checkpoint with the highest step, or None.

    Parameters
    ----------
    run_dir
        The run's output folder.
    verify
        Check each checkpoint's files against its ``checksums.json`` (sizes, then SHA-256), newest
        first: a damaged one is skipped for the previous complete one, with one line to ``log`` naming
        the checkpoint and the file.
    log
        Receives the fall-back lines (default: a warning of the ``atlasformer`` logger).

    Raises
    ------
    CheckpointError
        With ``verify``, when there are complete checkpoints but every one is damaged.
    """
    found = complete_checkpoints(run_dir)
    if not verify:
        return found[0] if found else None
    for folder in found:
        problem = damaged_file(folder)
        if problem is None:
            return folder
        log(f"checkpoint {folder} is damaged ({problem}); falling back to the previous complete checkpoint")
    if found:
        raise CheckpointError(f"{checkpoint_dir(run_dir)}: every complete checkpoint is damaged (see above), so the run "
                              "cannot be resumed; start a new --output, or init_from=<an exported model folder>.")
    return None


def _checkpoint_files(folder: Path) -> list[str]:
    """Relative paths of the files checksums.json covers: all but the marker and itself."""
    return sorted(name for p in folder.rglob("*") if p.is_file()
                  and (name := p.relative_to(folder).as_posix()) not in (MARKER, CHECKSUMS))


def write_checksums(folder: Path) -> None:
    """Record the size and SHA-256 of every file of the checkpoint in ``folder``."""
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256(folder / name)}
             for name in _checkpoint_files(folder)}
    (folder / CHECKSUMS).write_text(json.dumps({"files": files}, indent=1))


def damaged_file(folder: Path) -> str | None:
    """What is wrong with the checkpoint in ``folder`` (``"<file> ..."``), or None when its files are intact.

    Sizes are compared first (cheap, catches truncation), then SHA-256. Checkpoints written before
    checksums were recorded have nothing to compare with and count as intact.
    """
    path = folder / CHECKSUMS
    if not path.exists():
        return None
    try:
        files = dict(json.loads(path.read_text())["files"])
    except (ValueError, KeyError, TypeError):
        return f"{CHECKSUMS} is not valid"
    for name, info in files.items():
        file = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{CHECKSUMS} lists {name!r}, outside the checkpoint"
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != info["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, {info['bytes']} were written (truncated?)"
    for name, info in files.items():
        if sha256(folder / name) != info["sha256"]:
            return f"{name} does not match its SHA-256 (corrupt)"
    return None


def model_signature(model_config) -> dict:
    """The fields of ``model_config`` that fix the weights' shapes (:data:`ARCHITECTURE_FIELDS`)."""
    if model_config is None:
        return {}
    return {name: getattr(model_config, name, None) for name in ARCHITECTURE_FIELDS}


def check_same_model(folder: Path, saved: dict | None, model_config) -> None:
    """Refuse to resume ``folder`` into a model of another shape (other data, vocabulary or config).

    Checkpoints written before the signature was recorded are not checked here.
    """
    current = model_signature(model_config)
    changed = [name for name in ARCHITECTURE_FIELDS if saved and current and name in saved and saved[name] != current[name]]
    if changed:
        raise InputError(f"checkpoint {folder.name} was trained with {_describe(saved, changed)}; this run builds "
                         f"{_describe(current, changed)}: resume with the same --data and config, or start a new --output.")


def _describe(signature: dict, fields: list[str]) -> str:
    labels = {"vocab_size": "a vocabulary of {} tokens", "n_conditions": "{} condition tokens"}
    return " / ".join(labels.get(name, name + " {}").format(signature[name]) for name in fields)


def rng_state() -> dict:
    """This process's RNG states as tensors and JSON-able lists (no pickles)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _rng_to_files(state: dict, folder: Path, rank: int) -> None:
    tensors = {"torch": state["torch"]}
    for i, s in enumerate(state["cuda"]):
        tensors[f"cuda_{i}"] = s
    save_file(tensors, str(folder / f"rng_rank{rank}.safetensors"))
    (folder / f"rng_rank{rank}.json").write_text(json.dumps({"numpy": state["numpy"], "python": state["python"]}))


def _rng_from_files(folder: Path, rank: int) -> dict:
    tensors = load_safetensors(folder / f"rng_rank{rank}.safetensors", fix=CHECKPOINT_FIX)
    meta = json.loads((folder / f"rng_rank{rank}.json").read_text())
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    return {"torch": tensors["torch"], "cuda": cuda, **meta}


def save_checkpoint(engine, model, optimizer, scheduler, order, run_dir: str | Path, step: int, config: dict,
                    keep_last: int = 2) -> Path:
    """Write ``checkpoints/step-<step>/`` atomically; collective (every rank calls it).

    Rank 0 makes a temporary folder; every rank writes its part of the model and optimizer state
    there through the engine (one file, or its own shard under FSDP / ZeRO); rank 0 adds the
    scheduler, every rank's RNG state and data position, the config (and the model's architecture), the
    size and SHA-256 of every file, and last the ``COMPLETE`` marker, then renames the folder. A run killed at any point leaves either no ``step-<step>`` folder or a
    complete one. Needs a filesystem shared by all nodes.
    """
    root = checkpoint_dir(run_dir)
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    if engine.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    engine.barrier()
    engine.save_state(model, optimizer, tmp)
    data_states = engine.gather_objects(order.state_dict())
    rng_states = engine.gather_objects(rng_state())
    engine.barrier()
    if engine.is_main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for rank, state in enumerate(rng_states):
            _rng_to_files(state, tmp, rank)
        model_config = getattr(engine.unwrap(model), "config", None)
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"step": step, "strategy": engine.strategy, "world_size": engine.world_size, "data": data_states,
             "model": model_signature(model_config)}, indent=1))
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        write_checksums(tmp)  # after every other file, so that a resume can tell a damaged checkpoint
        _fsync_tree(tmp)
        (tmp / MARKER).write_text(str(step))
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(root)  # the rename itself is an entry of the parent folder
        prune_checkpoints(run_dir, keep_last)
    engine.barrier()
    return final


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder entry to disk before the marker is written, so a power cut cannot reorder them."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for path in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        _fsync_dir(path)


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (new files, renames): a file's own fsync does not cover its name."""
    if not hasattr(os, "O_DIRECTORY"):
        return  # Windows cannot open folders; NTFS journals their entries
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(engine, model, optimizer, scheduler, order, folder: Path) -> int:
    """Restore model, optimizer, scheduler, this rank's RNG and data position; returns the step.

    Tensors are read through safetensors or weights-only pickles only. Another strategy, number of
    processes, model shape (other data or config) or data order than the checkpoint's is refused before
    any weight is read.
    """
    state = _trainer_state(folder)
    saved_strategy = state.get("strategy", engine.strategy)
    if saved_strategy != engine.strategy:
        raise ValueError(f"{folder} was written with strategy={saved_strategy}; resume with the same strategy "
                         f"(or export it and start a new run with init_from).")
    saved_world = state.get("world_size", engine.world_size)
    if saved_world != engine.world_size:
        raise InputError(f"checkpoint {folder.name} was written by {saved_world} process(es), this run has "
                         f"{engine.world_size}: each process's data position depends on their number. Resume with "
                         f"{saved_world} processes, or start a new run with init_from=<exported model folder>.")
    check_same_model(folder, state.get("model"), getattr(engine.unwrap(model), "config", None))
    data = state["data"]
    order.load_state_dict(data[engine.rank] if engine.rank < len(data) else data[0])  # checks the data settings
    engine.load_state(model, optimizer, folder)
    scheduler.load_state_dict(load_weights_only(folder / "scheduler.pt", fix=CHECKPOINT_FIX))
    if (folder / f"rng_rank{engine.rank}.json").exists():
        set_rng_state(_rng_from_files(folder, engine.rank))
    return int(state["step"])


def _trainer_state(folder: Path) -> dict:
    path = folder / "trainer_state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}); {CHECKPOINT_FIX}.") from err


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints.

    The temporary folder of an interrupted save is left alone: it never counts as a checkpoint, and it
    is replaced when that step is saved again.
    """
    for path in complete_checkpoints(run_dir)[keep_last:]:
        (path / MARKER).unlink()  # first unmark, so a crash mid-delete never leaves a "complete" partial folder
        shutil.rmtree(path)


def weights_only_deepspeed_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, but loading with ``weights_only=True``.

    Only DeepSpeed's plain data classes found in its ZeRO files (a stage enum, loss-scaler state,
    fragment addresses) are allowed besides tensors and builtins.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_weights_only(path, map_location, fix=CHECKPOINT_FIX,
                                     safe_globals=(ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address))

    return WeightsOnlyCheckpointEngine()
