"""GPU and cluster paths of pretraining, checked on CPU (issue 14).

Each test stands in for what only a GPU or a cluster would show: FSDP2's bf16 input casting, the
SLURM template's CPU / GPU / port settings, host syncs and host-to-device copies in the loop, accelerate's
fp32 output conversion, per-rank dropout seeds, and the durability and order of checkpoint steps.
"""

from __future__ import annotations

import importlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_distributed import SCRIPTS, free_port, slurm_bin, slurm_env

from atlasformer.model_zoo import CellTransformerConfig, CellTransformerForPretraining
from atlasformer.pretrain import PretrainConfig
from atlasformer.pretrain import checkpoint as checkpoint_module
from atlasformer.pretrain.checkpoint import load_checkpoint, save_checkpoint
from atlasformer.pretrain.engine import Engine, FSDPEngine, encoder_blocks
from atlasformer.tokenization import BatchOrder, InputError, TokenizerConfig

train_module = importlib.import_module("atlasformer.pretrain.train")  # the package exports train() by that name
PRETRAIN_DIR = Path(train_module.__file__).parent


def tiny_model(**arch) -> CellTransformerForPretraining:
    config = CellTransformerConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, **arch)
    return CellTransformerForPretraining(config)


def tiny_batch(n_cells: int = 2, n_tokens: int = 8) -> dict[str, torch.Tensor]:
    values = torch.rand(n_cells, n_tokens, dtype=torch.float64).float() * 3 + 1e-3  # not representable in bf16
    return {"input_ids": torch.randint(4, 40, (n_cells, n_tokens)), "values": values,
            "attention_mask": torch.ones(n_cells, n_tokens, dtype=torch.bool), "value_targets": values.clone(),
            "target_mask": torch.ones(n_cells, n_tokens, dtype=torch.bool)}


def pretrain_config(data: Path, output: Path, **fields) -> PretrainConfig:
    settings = dict(model={"d_model": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.0},
                    tokenizer=TokenizerConfig(max_seq_len=64), batch_size=8, warmup_steps=1, eval_fraction=0.0,
                    save_every=1000, seed=3)
    return PretrainConfig(data=(str(data),), output=str(output), **{**settings, **fields})


@pytest.fixture
def one_process_group(monkeypatch):
    """The environment of a 1-process launch, restored afterwards (the engine fills it otherwise)."""
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for key, value in env.items():
        monkeypatch.setenv(key, value)


# ------------------------------------------------------------------------ item 4: FSDP2 bf16 inputs
def test_fsdp_bf16_keeps_regression_targets_fp32_and_feeds_blocks_bf16(one_process_group):
    engine = FSDPEngine(precision="bf16", cpu=True)
    try:
        model, _ = engine.prepare(tiny_model(value_encoding="continuous", value_head="mse", mvc_head=True),
                                  lambda params: torch.optim.AdamW(params))
        seen = {}
        # registered after FSDP's own pre-forward hooks, so they see what the modules receive
        model.register_forward_pre_hook(lambda m, args, kwargs: seen.update(
            targets=kwargs["value_targets"].dtype, values=kwargs["values"].dtype), with_kwargs=True)
        encoder_blocks(model)[0].register_forward_pre_hook(lambda m, args: seen.update(
            block_input=args[0].dtype, block_weight=m.linear1.weight.dtype))
        batch = tiny_batch()
        out = model(**batch)
        out.loss.backward()
    finally:
        engine.close()
    assert seen == {"targets": torch.float32, "values": torch.float32,
                    "block_input": torch.bfloat16, "block_weight": torch.bfloat16}
    assert out.loss.dtype == torch.float32 and out.hidden_states.dtype == torch.bfloat16


# ------------------------------------------------------------------------ item 6: the SLURM template
def test_slurm_template_gives_tasks_their_cpus_the_allocated_gpus_and_a_job_port(tmp_path):
    bin_dir = slurm_bin(tmp_path, run="echo torchrun")  # the stand-in prints the node command
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "GPUS_PER_NODE", "OMP_NUM_THREADS")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", **slurm_env(job_id=54321, gpus=4, cpus=16))
    result = subprocess.run(["bash", str(SCRIPTS / "slurm_pretrain.sbatch"), "--data", "d"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2  # one torchrun per node
    assert all("--nproc_per_node 4 " in line and "--rdzv_endpoint 127.0.0.1:34321 " in line for line in lines)
    # the stand-ins refuse what the real commands would get wrong: srun without the CPU count...
    plain = subprocess.run([str(bin_dir / "srun"), "--kill-on-bad-exit=1", "true"], env=env, capture_output=True, text=True)
    assert plain.returncode != 0 and "cpus-per-task" in plain.stderr
    # ...and a hard-coded GPU count or port
    for args in (["--nproc_per_node", "8", "--rdzv_endpoint", "h:34321"], ["--nproc_per_node", "4", "--rdzv_endpoint", "h:29500"]):
        wrong = subprocess.run([str(bin_dir / "torchrun"), *args], env=env, capture_output=True, text=True)
        assert wrong.returncode != 0, args


# ------------------------------------------------------------------------ item 7a: host syncs
def count_host_reads(monkeypatch) -> list[str]:
    """Record every tensor -> Python value conversion (a host sync on a GPU) made by pretrain's own code."""
    calls: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            caller = Path(sys._getframe(1).f_code.co_filename)
            if caller.parent == PRETRAIN_DIR and caller.name in ("train.py", "engine.py"):
                calls.append(f"{_name} at {caller.name}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls


def test_loop_reads_device_values_only_at_log_intervals(sim_h5ad, tmp_path, monkeypatch):
    counts = {}
    for steps in (2, 6):  # one metric line each: the same reads, however many steps it covers
        calls = count_host_reads(monkeypatch)
        train_module.train(pretrain_config(sim_h5ad, tmp_path / f"run{steps}", max_steps=steps, log_every=steps,
                                           grad_accum=2))
        counts[steps] = list(calls)
        monkeypatch.undo()
    assert counts[2], "the metric line reads the losses at least once"
    assert len(counts[6]) == len(counts[2]), counts
    rows = [json.loads(line) for line in (tmp_path / "run6" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [6] and rows[0]["train/loss"] > 0 and rows[0]["grad_norm"] > 0


# ------------------------------------------------------------------------ item 7b: host-to-device copies
def test_batches_go_to_the_gpu_pinned_and_without_blocking(monkeypatch):
    pinned, copies = [], []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(self.shape) or self)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a, **k: False)
    to = torch.Tensor.to

    def fake_to(self, *args, **kwargs):
        if args and str(args[0]).startswith("cuda"):
            copies.append(kwargs.get("non_blocking", False))
            return self
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    batch = tiny_batch()
    batch["attention_mask"][0, -2:] = False  # padded: the mask is needed
    moved = train_module.model_inputs(batch, torch.device("cuda", 0))
    assert set(moved) == set(batch)
    assert len(pinned) == len(batch) and copies == [True] * len(batch)
    pinned.clear()
    unpadded = tiny_batch()  # no padding: no mask goes to the device, so the flash kernel can run
    assert set(train_module.model_inputs(unpadded, torch.device("cuda", 0))) == set(unpadded) - {"attention_mask"}
    pinned.clear()
    train_module.model_inputs(batch, torch.device("cpu"))  # nothing to pin for a CPU run
    assert pinned == []


# ------------------------------------------------------------------------ item 7d: fp32 outputs under DDP
def test_ddp_bf16_returns_outputs_in_bf16_and_the_loss_in_fp32():
    engine = Engine(precision="bf16", cpu=True, fp32_outputs=False)
    try:
        model, _ = engine.prepare(tiny_model(value_head="bins", n_bins=11, gene_head=True),
                                  lambda params: torch.optim.AdamW(params))
        batch = tiny_batch()
        batch["values"] = batch["value_targets"] = batch["values"].floor()  # bin ids
        batch["gene_targets"] = batch["input_ids"]
        with engine.autocast():
            out = model(**batch)
    finally:
        engine.close()
    # the value and vocabulary-sized logits are not copied to fp32: only the loss needs it (the hidden
    # states leave a LayerNorm, which autocast runs in fp32)
    assert out.logits.dtype == out.extras["gene_logits"].dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32


def test_pretraining_engine_skips_the_fp32_output_copy():
    from atlasformer.pretrain.engine import make_engine

    engine = make_engine(PretrainConfig(precision="bf16", cpu=True))
    try:
        assert engine.fp32_outputs is False
    finally:
        engine.close()


# ------------------------------------------------------------------------ item 8a: per-rank seeds
def test_ranks_share_initial_weights_but_not_dropout():
    from accelerate.utils import set_seed

    weights, draws = [], []
    for rank in (0, 1):
        set_seed(5)  # what every rank's engine does before the model is built
        weights.append(tiny_model().state_dict())
        train_module.seed_rank(5, rank)
        draws.append(torch.nn.functional.dropout(torch.ones(64), 0.5))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(draws[0], draws[1])
    train_module.seed_rank(5, 1)
    assert torch.equal(torch.nn.functional.dropout(torch.ones(64), 0.5), draws[1])  # reproducible per rank


def test_train_seeds_each_rank_after_building_the_model(sim_h5ad, tmp_path, monkeypatch):
    events = []
    make_model, seed_rank = train_module.make_model, train_module.seed_rank
    monkeypatch.setattr(train_module, "make_model", lambda *a: events.append("model") or make_model(*a))
    monkeypatch.setattr(train_module, "seed_rank", lambda *a: events.append(("seed", *a)) or seed_rank(*a))
    train_module.train(pretrain_config(sim_h5ad, tmp_path / "run", max_steps=1))
    assert events == ["model", ("seed", 3, 0)]


# ------------------------------------------------------------------------ item 8b: resume checks first
def test_resume_with_another_world_size_fails_before_any_state_is_read(tmp_path):
    folder = tmp_path / "step-10"
    folder.mkdir()
    order = BatchOrder(64, 8, world_size=2)
    (folder / "trainer_state.json").write_text(json.dumps(
        {"step": 10, "strategy": "ddp", "world_size": 2, "data": [order.state_dict()] * 2}))

    def load_state(*args):
        raise AssertionError("model and optimizer state read before the world-size check")

    engine = SimpleNamespace(strategy="ddp", world_size=1, rank=0, unwrap=lambda m: m, load_state=load_state)
    with pytest.raises(InputError, match="2 process"):
        load_checkpoint(engine, torch.nn.Linear(1, 1), None, None, BatchOrder(64, 8), folder)


# ------------------------------------------------------------------------ item 8d: directory fsync
class OneProcessEngine:
    """The engine's checkpoint-facing part for one process."""

    strategy, world_size, rank, is_main = "ddp", 1, 0, True

    def barrier(self) -> None:
        pass

    def save_state(self, model, optimizer, folder: Path) -> None:
        (folder / "sharded").mkdir()
        (folder / "sharded" / "model.safetensors").write_bytes(b"weights")

    def gather_objects(self, obj) -> list:
        return [obj]

    def unwrap(self, model):
        return model


@pytest.mark.skipif(not hasattr(os, "O_DIRECTORY"), reason="directories cannot be opened for fsync here")
def test_checkpoint_folders_and_the_rename_are_fsynced(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync
    final = tmp_path / "checkpoints" / "step-3"

    def spy(fd):
        info = os.fstat(fd)
        synced.append((info.st_ino, stat.S_ISDIR(info.st_mode), final.exists()))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    save_checkpoint(OneProcessEngine(), torch.nn.Linear(1, 1), optimizer, scheduler, BatchOrder(64, 8), tmp_path, 3, {})
    assert final.is_dir() and (final / checkpoint_module.MARKER).exists()
    inode = {p: p.stat().st_ino for p in (final, final / "sharded", final.parent)}
    # the folders' entries before the marker (the folder keeps its inode through the rename)...
    assert (inode[final], True, False) in synced and (inode[final / "sharded"], True, False) in synced
    # ...and the rename itself, in the parent folder
    assert (inode[final.parent], True, True) in synced
