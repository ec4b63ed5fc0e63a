"""Two CPU processes (gloo) under each strategy and launcher compute what one process computes.

The reference is one process with ``grad_accum=2``: the same global batch, the same cells and the same
masks as two processes with one micro-batch each. Each run must reproduce its loss trajectory over 20
steps, its held-out loss and its exported weights:

- DDP through ``scripts/launch_accelerate.sh`` (``accelerate launch``, configs/accelerate/cpu_2proc.yaml);
- FSDP2 through ``scripts/launch_torchrun.sh`` on one node;
- DeepSpeed ZeRO-3 through ``scripts/launch_torchrun.sh`` as two "nodes" (two torchrun agents meeting
  at a c10d rendezvous, one process each);
- DeepSpeed ZeRO-2 through ``scripts/slurm_pretrain.sbatch`` as two nodes, with stand-ins for
  ``scontrol``, ``srun`` (starts the node command once per node) and ``torchrun``, which refuse a step
  without the CPU count, a process count other than ``SLURM_GPUS_ON_NODE`` and a port not derived
  from the job id, as a real cluster would fail or misbehave.

FSDP and ZeRO-3 runs resumed from their sharded checkpoints must continue exactly. The venv's python
stands in for the ``torchrun`` and ``accelerate`` commands.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from atlasformer.tokenization import simulate_counts

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "pretrain" / "tiny.yaml")
SCRIPTS = REPO / "scripts"
TORCH_RUN = f"{sys.executable} -m torch.distributed.run"
SINGLE = ([sys.executable, "-m", "atlasformer.cli", "pretrain"], {}, 1)
SRUN = """#!/usr/bin/env bash
# srun stand-in: refuse a step without the CPU count (since Slurm 22.05 srun does not inherit
# --cpus-per-task, and every task would share one core), then run the command once per node
cpus=${SRUN_CPUS_PER_TASK:-}
while [[ "$1" == -* ]]; do
    case "$1" in
        --cpus-per-task=*) cpus=${1#*=} ;;
        --cpus-per-task|-c) cpus=$2; shift ;;
    esac
    shift
done
if [[ "$cpus" != "$SLURM_CPUS_PER_TASK" ]]; then
    echo "srun: got ${cpus:-no} --cpus-per-task / SRUN_CPUS_PER_TASK, the job has $SLURM_CPUS_PER_TASK" >&2
    exit 1
fi
pids=()
for _ in $(seq "$SLURM_NNODES"); do "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""
TORCHRUN = """#!/usr/bin/env bash
# torchrun stand-in: refuse a process count other than the node's GPUs and a port not derived from the job
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --nproc_per_node) nproc=${args[i + 1]} ;;
        --rdzv_endpoint) port=${args[i + 1]##*:} ;;
    esac
done
if [[ "${nproc:-}" != "$SLURM_GPUS_ON_NODE" ]]; then
    echo "torchrun: --nproc_per_node ${nproc:-unset}, but SLURM_GPUS_ON_NODE=$SLURM_GPUS_ON_NODE" >&2
    exit 1
fi
if [[ "${port:-}" != "$((20000 + SLURM_JOB_ID % 20000))" ]]; then
    echo "torchrun: port ${port:-unset} is not derived from SLURM_JOB_ID=$SLURM_JOB_ID" >&2
    exit 1
fi
exec {run} "$@"
"""


def slurm_bin(tmp_path: Path, run: str = TORCH_RUN) -> Path:
    """A folder of stand-ins for ``srun``, ``scontrol`` and ``torchrun`` (which runs ``run``)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in {"srun": SRUN, "scontrol": "#!/usr/bin/env bash\necho 127.0.0.1\n",
                       "torchrun": TORCHRUN.replace("{run}", run)}.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def slurm_env(job_id: int, gpus: int = 1, cpus: int = 1) -> dict[str, str]:
    """What SLURM sets for a job of two nodes."""
    return {"SLURM_JOB_NODELIST": "node[0-1]", "SLURM_NNODES": "2", "SLURM_JOB_ID": str(job_id),
            "SLURM_CPUS_PER_TASK": str(cpus), "SLURM_GPUS_ON_NODE": str(gpus)}


def free_job_port() -> int:
    """A free port in the template's job-derived range (20000 + job id % 20000)."""
    for port in range(20000 + os.getpid() % 20000, 40000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000..39999")


EACH_NODE = "<node rank>"
"""A launcher environment value replaced by each node command's own rank (0, 1, ...)."""


def launcher(kind: str, tmp_path: Path) -> tuple[list[str], dict, int]:
    """(command prefix, environment, node commands to start) for each documented launch."""
    port = str(free_port())
    if kind == "accelerate":
        return (["bash", str(SCRIPTS / "launch_accelerate.sh")],
                {"ACCELERATE_CONFIG": "configs/accelerate/cpu_2proc.yaml", "MASTER_PORT": port,
                 "ACCELERATE": f"{sys.executable} -m accelerate.commands.launch"}, 1)
    if kind == "torchrun":
        return ["bash", str(SCRIPTS / "launch_torchrun.sh")], {"NPROC_PER_NODE": "2", "TORCHRUN": TORCH_RUN}, 1
    if kind == "torchrun_2nodes":  # a static rendezvous: each node command gets its NODE_RANK
        return (["bash", str(SCRIPTS / "launch_torchrun.sh")],
                {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                 "NODE_RANK": EACH_NODE, "TORCHRUN": TORCH_RUN}, 2)
    # SLURM: two nodes of one process each, on a job id whose derived port is free
    bin_dir = slurm_bin(tmp_path)
    return (["bash", str(SCRIPTS / "slurm_pretrain.sbatch")],
            {"PATH": f"{bin_dir}:{os.environ['PATH']}", **slurm_env(job_id=free_job_port() - 20000)}, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain(launch: tuple[list[str], dict, int], data: Path, output: Path, *overrides: str,
             resume: bool = False) -> dict[int, dict]:
    """Run ``atlasformer pretrain`` as ``launch`` says; returns metrics.jsonl as {step: merged metrics}."""
    prefix, launcher_env, nodes = launch
    command = [*prefix, "--data", str(data), "--output", str(output), "--config", TINY,
               *(["--resume"] if resume else []), *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "GPUS_PER_NODE")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **launcher_env)
    # one command per node (each node's torchrun agent joins the same rendezvous)
    procs = [subprocess.Popen(command, cwd=REPO, env={k: str(node) if v == EACH_NODE else v for k, v in env.items()},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in range(nodes)]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{' '.join(command)}\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return read_metrics(output)


def read_metrics(output: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for line in (output / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


def assert_same_run(run: dict[int, dict], reference: dict[int, dict], tol: float, steps=range(1, 21)) -> None:
    for step in steps:
        assert run[step]["train/loss"] == pytest.approx(reference[step]["train/loss"], abs=tol), f"step {step}"
    for step in (s for s in (10, 20) if s in steps):
        assert run[step]["eval/loss"] == pytest.approx(reference[step]["eval/loss"], abs=tol), f"eval at {step}"


def assert_same_weights(folder: Path, reference: Path, tol: float) -> None:
    ours, theirs = load_file(str(folder / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert (ours[name] - tensor).abs().max() <= tol, name


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sim.h5ad"
    simulate_counts(n_cells=400, n_genes=200, n_cell_types=4, n_batches=2, seed=0).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    """One process, two micro-batches per step: the global batch of two processes."""
    output = tmp_path_factory.mktemp("single")
    return output, pretrain(SINGLE, data, output, "grad_accum=2")


def test_ddp_two_processes_match_one_process(data, reference, tmp_path):
    ref_dir, ref = reference
    run = pretrain(launcher("accelerate", tmp_path), data, tmp_path)
    assert_same_run(run, ref, tol=1e-5)
    assert_same_weights(tmp_path / "model", ref_dir / "model", tol=1e-5)
    state = json.loads((tmp_path / "checkpoints" / "step-20" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["data"]) == 2


@pytest.mark.parametrize("strategy", ["fsdp", "zero2", "zero3"])
def test_sharded_strategies_match_one_process_and_resume(strategy, data, reference, tmp_path):
    ref_dir, ref = reference
    overrides = {"fsdp": ["strategy=fsdp"],
                 "zero2": ["strategy=deepspeed", "deepspeed_config=configs/accelerate/zero2.json"],
                 "zero3": ["strategy=deepspeed", "zero_stage=3"]}[strategy]
    kind = {"fsdp": "torchrun", "zero2": "slurm", "zero3": "torchrun_2nodes"}[strategy]
    run = pretrain(launcher(kind, tmp_path), data, tmp_path / "run", *overrides)
    assert_same_run(run, ref, tol=1e-5)
    # the exported folder is consolidated from the shards into one safetensors file
    assert_same_weights(tmp_path / "run" / "model", ref_dir / "model", tol=1e-5)
    step10 = tmp_path / "run" / "checkpoints" / "step-10"
    assert (step10 / ("sharded" if strategy == "fsdp" else "deepspeed")).is_dir()
    assert not (step10 / "model.safetensors").exists()
    if strategy == "zero2":
        return  # resuming ZeRO-3 covers DeepSpeed's checkpoint files; FSDP covers torch's
    # resume from the sharded step-10 checkpoint: steps 11..20 continue the run exactly
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(step10, resumed / "checkpoints" / "step-10")
    run2 = pretrain(launcher(kind, tmp_path), data, resumed, *overrides, resume=True)
    assert min(run2) == 11
    assert_same_run(run2, run, tol=1e-6, steps=range(11, 21))
