"""Training-state checkpoints: ``<run_dir>/checkpoints/step-<N>/`` written atomically, found by marker.

A checkpoint holds the model and optimizer state in the engine's format (``model.safetensors`` +
``optimizer.pt`` for ddp; sharded safetensors under ``sharded/`` for fsdp; DeepSpeed's ZeRO files
under ``deepspeed/``), the scheduler state, every rank's RNG state and data position, and the resolved
config. Pickled files are only ever read with ``torch.load(weights_only=True)``. It is written into a
temporary folder and renamed; the ``COMPLETE`` marker is the last file written, and only folders
holding it are ever resumed from. The newest ``keep_last`` complete checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None; half-written folders are ignored."""
    root = checkpoint_dir(run_dir)
    if not root.exists():
        return None
    complete = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / MARKER).exists():
            complete.append((int(match.group(1)), path))
    return max(complete)[1] if complete else None


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
    tensors = load_file(str(folder / f"rng_rank{rank}.safetensors"))
    meta = json.loads((folder / f"rng_rank{rank}.json").read_text())
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    return {"torch": tensors["torch"], "cuda": cuda, **meta}


def save_checkpoint(engine, model, optimizer, scheduler, order, run_dir: str | Path, step: int, config: dict,
                    keep_last: int = 2) -> Path:
    """Write ``checkpoints/step-<step>/`` atomically; collective (every rank calls it).

    Rank 0 makes a temporary folder; every rank writes its part of the model and optimizer state
    there through the engine (one file, or its own shard under FSDP / ZeRO); rank 0 adds the
    scheduler, every rank's RNG state and data position, the config, and last the ``COMPLETE`` marker,
    then renames the folder. A run killed at any point leaves either no ``step-<step>`` folder or a
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
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"step": step, "strategy": engine.strategy, "world_size": engine.world_size, "data": data_states}, indent=1))
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        _fsync_tree(tmp)
        (tmp / MARKER).write_text(str(step))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        prune_checkpoints(run_dir, keep_last)
    engine.barrier()
    return final


def _fsync_tree(folder: Path) -> None:
    """Flush every file to disk before the marker is written, so a power cut cannot reorder them."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def load_checkpoint(engine, model, optimizer, scheduler, order, folder: Path) -> int:
    """Restore model, optimizer, scheduler, this rank's RNG and data position; returns the step.

    Tensors are read through safetensors or ``torch.load(weights_only=True)`` only.
    """
    state = json.loads((folder / "trainer_state.json").read_text())
    saved_strategy = state.get("strategy", engine.strategy)
    if saved_strategy != engine.strategy:
        raise ValueError(f"{folder} was written with strategy={saved_strategy}; resume with the same strategy "
                         f"(or export it and start a new run with init_from).")
    engine.load_state(model, optimizer, folder)
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    data = state["data"]
    order.load_state_dict(data[engine.rank] if engine.rank < len(data) else data[0])
    if (folder / f"rng_rank{engine.rank}.json").exists():
        set_rng_state(_rng_from_files(folder, engine.rank))
    return int(state["step"])


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints.

    The temporary folder of an interrupted save is left alone: it never counts as a checkpoint, and it
    is replaced when that step is saved again.
    """
    root = checkpoint_dir(run_dir)
    steps = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / MARKER).exists()
    )
    for _, path in steps[: max(0, len(steps) - keep_last)]:
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
            with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine()
