"""Fine-tuning with two CPU processes (gloo, ``accelerate launch`` with configs/accelerate/cpu_2proc.yaml): the four
tasks, fully fine-tuned through ``atlasformer finetune``, on a backbone with condition tokens the tasks leave unused.

One launch runs the four commands one after the other (a driver calls the CLI's ``main`` per task), and records per
rank how many validations each fit ran, a digest of the weights it returned, and which outputs it wrote. The
validation score is made rank-dependent (rank 0 always worse, rank 1 always better): alone, rank 0 would stop at its
second validation and rank 1 never, so both stopping together shows that rank 0's decision is the one taken.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pytest

from atlasformer.finetune import Annotator, Imputer, Integrator, ModalityPredictor
from atlasformer.tokenization import simulate_counts, simulate_proteins

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
DRIVER = '''
import json, os, sys
from pathlib import Path

import atlasformer.cli as cli
from atlasformer.finetune import annotation, common, imputation, integration, modality, runner

RANK = int(os.environ["RANK"])
RECORD = Path(sys.argv[1]) / f"rank{RANK}.jsonl"


def record(**event):
    with RECORD.open("a") as f:
        f.write(json.dumps(event) + "\\n")


def recorded_fit(task, fit):
    def wrapper(model, n_train, make_batch, validate, cfg, **kw):
        calls = []

        def rank_dependent(m):  # rank 0 always worse (alone it stops at its 2nd validation), rank 1 always better
            calls.append(1)
            score, metrics = validate(m)
            return score + (-1e3 if RANK == 0 else 1e3) * len(calls), metrics

        best, metrics = fit(model, n_train, make_batch, rank_dependent, cfg, **kw)
        record(task=task, event="fit", validations=len(calls), weights=common.weights_fingerprint(best).hex())
        return best, metrics
    return wrapper


for name, module in [("annotation", annotation), ("integration", integration), ("imputation", imputation),
                     ("modality", modality)]:
    module.fit = recorded_fit(name, module.fit)
save, write = common.FinetunedTask.save, runner.write_h5ad_atomic
common.FinetunedTask.save = lambda self, folder, *a, **kw: (record(event="save", path=str(folder)),
                                                            save(self, folder, *a, **kw))[1]
runner.write_h5ad_atomic = lambda adata, path: (record(event="write", path=str(path)), write(adata, path))[1]
exit_worker, cli.finished_worker_exit = cli.finished_worker_exit, lambda: 0  # leave once, after the last command
for argv in json.loads(sys.argv[2]):
    assert cli.main(argv) == 0, argv
exit_worker()
'''
STEPS, EVAL_EVERY = 8, 2
SETTINGS = ["--from-scratch", "mode=full", f"max_steps={STEPS}", f"eval_every={EVAL_EVERY}", "patience=1",
            "batch_size=8", "val_fraction=0.25", "expression_genes=20", "max_seq_len=32",
            "scratch_model.d_model=16", "scratch_model.n_layers=1", "scratch_model.n_heads=2",
            "scratch_model.dropout=0.0", "scratch_model.n_conditions=2"]  # condition tokens no task feeds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Run the four fine-tuning commands under one 2-process launch; returns (output root, stdout, events per rank)."""
    root = tmp_path_factory.mktemp("ddp_finetune")
    adata = simulate_counts(n_cells=160, n_genes=80, n_cell_types=3, n_batches=2, seed=0)
    adata.write_h5ad(root / "cells.h5ad")
    simulate_proteins(adata, n_proteins=5, seed=0).write_h5ad(root / "cells.protein.h5ad")
    data = ["--data", str(root / "cells.h5ad")]
    commands = [
        ["finetune", "annotation", *data, "--output", str(root / "annotation"), "--labels-key", "cell_type"],
        ["finetune", "integration", *data, "--output", str(root / "integration"), "--batch-key", "batch"],
        ["finetune", "imputation", *data, "--output", str(root / "imputation")],
        ["finetune", "modality", *data, "--output", str(root / "modality"), "--paired",
         str(root / "cells.protein.h5ad")],
    ]
    (root / "driver.py").write_text(DRIVER)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
               str(root / "driver.py"), str(root), json.dumps([["-q", *c, *SETTINGS] for c in commands])]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # its own session: ranks left waiting for each other (a stop decision not shared) are killed with the launcher
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the launch hung (ranks waiting for each other):\n{stdout[-3000:]}\n{stderr[-6000:]}")
    assert proc.returncode == 0, f"{stdout[-3000:]}\n{stderr[-6000:]}"
    events = {rank: [json.loads(line) for line in (root / f"rank{rank}.jsonl").read_text().splitlines()]
              for rank in (0, 1)}
    return root, stdout, events


TASKS = {"annotation": (Annotator, "obs", "atlasformer_label"),
         "integration": (Integrator, "obsm", "X_atlasformer_integrated"),
         "imputation": (Imputer, "layers", "atlasformer_denoised"),
         "modality": (ModalityPredictor, "obsm", "protein_predicted")}


def test_ranks_stop_together_on_rank_0s_decision_with_the_same_weights(launched):
    _, _, events = launched
    fits = {rank: {e["task"]: e for e in events[rank] if e["event"] == "fit"} for rank in (0, 1)}
    assert set(fits[0]) == set(fits[1]) == set(TASKS)
    for task in TASKS:
        # rank 0 saw no improvement at the 2nd validation (patience 1): both stopped there, before the last step
        assert fits[0][task]["validations"] == fits[1][task]["validations"] == 2 < STEPS // EVAL_EVERY, task
        assert fits[0][task]["weights"] == fits[1][task]["weights"], task


def test_only_rank_0_writes_each_output_once(launched):
    root, stdout, events = launched
    writes = {rank: sorted(e["path"] for e in events[rank] if e["event"] in ("save", "write")) for rank in (0, 1)}
    assert writes[1] == []
    assert writes[0] == sorted([str(root / task / "model") for task in TASKS] +
                               [str(root / task / "cells.h5ad") for task in TASKS])
    assert stdout.count("outputs written to") == len(TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_outputs_are_complete_and_load(launched, task):
    root, _, _ = launched
    cls, slot, key = TASKS[task]
    folder = root / task
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".atlasformer-output"]
    assert leftovers == []  # no temporary or replaced folders from a second writer
    assert cls.load(folder / "model").model is not None
    assert key in getattr(ad.read_h5ad(folder / "cells.h5ad"), slot)
    assert json.loads((folder / "metrics.json").read_text())["validation"]
