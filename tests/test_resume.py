"""A run killed with SIGKILL and resumed reaches exactly the loss of an uninterrupted run.

The run is killed while it writes its step-15 checkpoint (weights and optimizer written, marker not
yet), the worst moment: the half-written folder must never be taken for a checkpoint, resuming
continues from step 10, and with dropout on, the restored RNG states make steps 11..20 identical
(CPU, fp32, same world size). Sharded (FSDP, ZeRO-3) resumes are in test_distributed.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from atlasformer.pretrain.checkpoint import MARKER, latest_checkpoint, load_checkpoint
from atlasformer.tokenization import simulate_counts

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["save_every=5", "keep_last=2", "model.dropout=0.1", "grad_accum=2"]

# Kills its own process in the middle of writing the step-15 checkpoint, as a node failure would.
KILLER = """
import os, signal, sys
from atlasformer.cli import main
from atlasformer.pretrain import checkpoint

write_rng = checkpoint._rng_to_files

def write_rng_or_die(state, folder, rank):
    if folder.name == ".step-15.tmp":
        os.kill(os.getpid(), signal.SIGKILL)
    write_rng(state, folder, rank)

checkpoint._rng_to_files = write_rng_or_die
sys.exit(main(sys.argv[1:]))
"""


def run(script: list[str], data: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, *script, "pretrain", "--data", str(data), "--output", str(output),
               "--config", str(REPO / "configs" / "pretrain" / "tiny.yaml"), *extra, *OVERRIDES]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def train_losses(output: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r} | {
        -r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}  # eval losses under negative steps


def test_sigkill_mid_checkpoint_then_resume_matches_uninterrupted(tmp_path):
    data = tmp_path / "sim.h5ad"
    simulate_counts(n_cells=400, n_genes=200, n_cell_types=4, n_batches=2, seed=1).write_h5ad(data)
    (tmp_path / "killer.py").write_text(KILLER)

    full = run(["-m", "atlasformer.cli"], data, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-4000:]

    killed = run([str(tmp_path / "killer.py")], data, tmp_path / "run")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / ".step-15.tmp" / "model.safetensors").exists()  # half-written...
    assert not (checkpoints / "step-15").exists()  # ...and never looks complete
    assert latest_checkpoint(tmp_path / "run") == checkpoints / "step-10"
    assert not (tmp_path / "run" / "model").exists()

    resumed = run(["-m", "atlasformer.cli"], data, tmp_path / "run", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout + resumed.stderr

    reference, ours = train_losses(tmp_path / "full"), train_losses(tmp_path / "run")
    for step in [*range(11, 21), -20]:
        assert ours[step] == pytest.approx(reference[step], abs=1e-6), f"step {step}"
    weights, reference_weights = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("run", "full"))
    assert all((weights[k] - v).abs().max() <= 1e-6 for k, v in reference_weights.items())
    # the last two complete checkpoints are kept; nothing half-written is left behind
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-15", "step-20"]
    assert all((checkpoints / name / MARKER).exists() for name in ("step-15", "step-20"))


def test_resume_refuses_another_strategy(tmp_path):
    """Sharded formats differ between strategies: resuming under another one is refused by name."""
    folder = tmp_path / "step-10"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"step": 10, "strategy": "fsdp", "world_size": 2, "data": []}))
    with pytest.raises(ValueError, match="strategy=fsdp"):
        load_checkpoint(SimpleNamespace(strategy="ddp"), None, None, None, None, folder)
