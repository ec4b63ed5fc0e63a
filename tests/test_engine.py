"""The engine's pure parts: launch configs, DeepSpeed config filling, FLOP counts, checkpoint layout, config checks.

Multi-process runs are in test_distributed.py and test_resume.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from atlasformer.config import load_config
from atlasformer.model_zoo import CellTransformerConfig, CellTransformerForPretraining, count_parameters
from atlasformer.model_zoo.cell_transformer import matmul_flops_per_token, training_flops
from atlasformer.pretrain import PretrainConfig
from atlasformer.pretrain.checkpoint import MARKER, latest_checkpoint, prune_checkpoints
from atlasformer.pretrain.engine import check_launcher, fill_deepspeed_config, peak_tflops
from atlasformer.pretrain.train import condition_ids

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
DEEPSPEED_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.json"))


# ------------------------------------------------------------------------------- launch configs
@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_is_accepted_by_accelerate_launch(path, monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    monkeypatch.chdir(REPO)  # DeepSpeed JSON paths in the configs are relative to the repository root
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "atlasformer.cli", "pretrain"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    kind = defaults.distributed_type
    # the environment accelerate hands to each process, built as `accelerate launch` builds it
    if kind == DistributedType.DEEPSPEED:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        json_path = Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
        assert json_path.exists(), f"{path.name} names a missing DeepSpeed config {json_path}"
    elif kind in (DistributedType.MULTI_GPU, DistributedType.FSDP):
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    strategy = {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "deepspeed"}.get(kind, "ddp")
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.setenv(key, env.get(key, "false"))
    check_launcher(strategy)  # the engine accepts the strategy the config launches...
    if strategy != "ddp":
        with pytest.raises(ValueError, match=f"strategy={strategy}"):
            check_launcher("ddp")  # ...and names the fix when the run's strategy differs


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_json_is_accepted_by_deepspeed(path):
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads(path.read_text())
    HfDeepSpeedConfig(raw)  # what accelerate's DeepSpeed plugin reads
    filled = fill_deepspeed_config(raw, micro_batch_size=8, grad_accum=2, world_size=1, clip_grad=1.0,
                                   precision="bf16", zero_stage=None, offload=None)
    parsed = DeepSpeedConfig(filled)  # DeepSpeed's own (pydantic, extra keys forbidden) validation
    assert parsed.train_batch_size == 16 and parsed.gradient_accumulation_steps == 2
    assert parsed.zero_optimization_stage == raw["zero_optimization"]["stage"]
    assert (parsed.zero_config.offload_optimizer is not None) == ("offload" in path.stem)


def test_fill_deepspeed_config_defaults_and_conflicts():
    run = dict(micro_batch_size=4, grad_accum=1, world_size=2, clip_grad=0.5, precision="fp32")
    plain = fill_deepspeed_config({}, **run, zero_stage=None, offload=None)
    assert plain["zero_optimization"] == {"stage": 2}
    assert plain["train_batch_size"] == 8 and plain["gradient_clipping"] == 0.5
    assert not plain["bf16"]["enabled"] and not plain["fp16"]["enabled"]
    offloaded = fill_deepspeed_config({}, **run, zero_stage=3, offload=True)
    assert offloaded["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offloaded["zero_optimization"]["offload_param"]["device"] == "cpu"
    with pytest.raises(ValueError, match="zero_stage=2"):
        fill_deepspeed_config({"zero_optimization": {"stage": 3}}, **run, zero_stage=2, offload=None)
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu"):
        fill_deepspeed_config({"train_micro_batch_size_per_gpu": 32}, **run, zero_stage=None, offload=None)
    with pytest.raises(ValueError, match="precision=fp32"):
        fill_deepspeed_config({"bf16": {"enabled": True}}, **run, zero_stage=None, offload=None)


# ------------------------------------------------------------------------------- YAML configs
@pytest.mark.parametrize("name", ["tiny", "small", "base", "large"])
def test_pretrain_configs_load(name):
    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / f"{name}.yaml")
    assert cfg.model == yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())


def test_model_sizes():
    """small ~10M (25k vocabulary), base scGPT-sized, large Geneformer-V2-sized."""
    counts = {}
    for name in ("small", "base", "large"):
        fields = yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())
        config = CellTransformerConfig(vocab_size=25_426, **fields)
        counts[name] = count_parameters(CellTransformerForPretraining(config))
        shape = (config.n_layers, config.d_model, config.n_heads)
        assert shape == {"small": (6, 256, 4), "base": (12, 512, 8), "large": (12, 768, 12)}[name]
    assert 8e6 < counts["small"] < 12e6
    assert counts["small"] < counts["base"] < counts["large"]


def test_pretrain_config_checks():
    with pytest.raises(ValueError, match="bf16"):
        PretrainConfig(strategy="fsdp", precision="fp16")
    with pytest.raises(ValueError, match="strategy=deepspeed"):
        PretrainConfig(strategy="ddp", zero_stage=3)
    with pytest.raises(ValueError, match="masked_gene"):
        PretrainConfig(objectives={"masked_gene": 1.0})  # binned input: genes are not hidden
    rank = load_config(PretrainConfig, overrides=["tokenizer.kind=rank"])
    assert rank.objectives == {"masked_gene": 1.0}  # the default objective of rank-value input
    with pytest.raises(ValueError, match="tokenizer.kind=rank"):
        load_config(PretrainConfig, overrides=["tokenizer.kind=rank", "objectives={mvc: 1.0}"])


# ------------------------------------------------------------------------------- FLOPs and MFU
def test_training_flops_counts_real_tokens_only():
    config = CellTransformerConfig(d_model=32, n_layers=2, n_heads=2, n_bins=11, value_head="bins")
    lengths = torch.tensor([10, 30])
    d, ff = 32, 128
    encoder = sum(2 * (n * 2 * (4 * d * d + 2 * d * ff) + 4 * d * n * n) for n in (10, 30))  # 2 layers
    heads = 40 * 2 * (2 * d * d + d * 11)
    assert training_flops(config, lengths) == pytest.approx(3 * (encoder + heads))
    # consistent with the per-token count of the encoder at a given length
    assert training_flops(config, torch.tensor([30])) >= 3 * 30 * matmul_flops_per_token(config, 30)


def test_peak_tflops_stated_or_measured():
    assert peak_tflops(torch.device("cpu"), "fp32", 12.5) == (12.5, "stated (peak_tflops)")
    measured, source = peak_tflops(torch.device("cpu"), "fp32")
    assert measured > 0 and "measured" in source


# ------------------------------------------------------------------------------- conditions
def test_condition_ids_one_and_several_keys():
    labels = np.array([["b1", "10x"], ["b0", "smart"], ["b1", "smart"]])
    ids, names = condition_ids(labels[:, :1], ["batch"])
    assert names == ["b0", "b1"] and ids.tolist() == [1, 0, 1]
    ids, names = condition_ids(labels, ["batch", "tech"])
    assert names == ["batch=b0", "batch=b1", "tech=10x", "tech=smart"]
    assert ids.tolist() == [[1, 2], [0, 3], [1, 3]]
    config = CellTransformerConfig(n_conditions=len(names))
    model = CellTransformerForPretraining(config)
    out = model(torch.tensor([[1, 5, 6]] * 3), torch.tensor([[0.0, 3, 4]] * 3), conditions=torch.from_numpy(ids))
    assert out.cell_embedding.shape == (3, config.d_model)


# ------------------------------------------------------------------------------- checkpoint layout
def test_latest_checkpoint_ignores_unfinished_and_prune_keeps_last(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (5, 10, 15):
        (root / f"step-{step}").mkdir(parents=True)
        (root / f"step-{step}" / MARKER).write_text(str(step))
    (root / "step-20").mkdir()  # no marker: interrupted before completion
    (root / ".step-25.tmp").mkdir()
    (root / ".step-25.tmp" / MARKER).write_text("25")  # finished but never renamed
    assert latest_checkpoint(tmp_path) == root / "step-15"
    prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in root.iterdir() if (p / MARKER).exists()) == [".step-25.tmp", "step-10", "step-15"]
    assert not (root / "step-5").exists()


def test_threads_follow_omp_num_threads_after_numba_raised_them(monkeypatch):
    """numba (scanpy) raises the shared OpenMP thread count; the engine sets torch back to OMP_NUM_THREADS."""
    import torch

    from atlasformer.pretrain.engine import configure_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(2)  # what numba's pool start leaves behind
        configure_threads(0)
        assert torch.get_num_threads() == 1
        configure_threads(2)  # an explicit setting wins
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
