"""The command line: every subcommand has --help; quickstart, pretrain, finetune, predict and embed run end
to end on simulated data and write what FORMATS.md promises; errors are one clear line, exit code 2."""

import hashlib
import json
import os
import subprocess
import sys

import anndata as ad
import pytest

from atlasformer.cli import build_parser, main

SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "atlasformer.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--output" in capsys.readouterr().out or command in ("hub", "convert", "genes", "index")  # groups of commands


def test_required_subcommands_exist():
    assert {"tokenize", "pretrain", "finetune", "embed", "predict", "quickstart"} <= set(SUBCOMMANDS)


def test_quickstart_fine_tunes_every_head_and_prints_metrics(tmp_path):
    proc = run("quickstart", "--output", tmp_path / "qs", "--n-cells", "300", "max_steps=20", "eval_every=10")
    for line in ("annotation on held-out cells: accuracy", "integration on held-out cells: batch_mixing_entropy",
                 "imputation on held-out cells: poisson_nll", "modality on held-out cells: rmse"):
        assert line in proc.stdout, line
    assert "no_denoising.poisson_nll" in proc.stdout and "mean_baseline.rmse" in proc.stdout  # baselines, named
    for noise in ("Setting accelerator to CPU", "strategy ddp", "validation score", "INFO:"):  # tests/test_console.py
        assert noise not in proc.stderr, noise
    assert proc.stderr.count("simulated.h5ad: 300/300 cells kept") == 1, proc.stderr  # the file's report, once
    for path in ("pretrain/model/model.safetensors", "annotation/model/config.json", "annotation/simulated.h5ad",
                 "annotation/metrics.json", "annotation/confusion_matrix.png", "simulated.protein.h5ad"):
        assert (tmp_path / "qs" / path).exists(), path
    for head in ("integration", "imputation", "modality"):
        summary = json.loads((tmp_path / "qs" / head / "metrics.json").read_text())
        assert summary["validation"]["n_val"] > 0 and (tmp_path / "qs" / head / "model" / "config.json").exists()
    assert "X_atlasformer_integrated" in ad.read_h5ad(tmp_path / "qs" / "integration" / "simulated.h5ad").obsm


def test_pretrain_finetune_predict_embed(tmp_path, sim_h5ad):
    before = hashlib.sha256(sim_h5ad.read_bytes()).hexdigest()
    run("pretrain", "--data", sim_h5ad, "--output", tmp_path / "run", "--batch-key", "batch", "model=tiny",
        "max_steps=12", "batch_size=16", "eval_every=6", "save_every=6", "tokenizer.max_seq_len=64")
    model = tmp_path / "run" / "model"
    config = json.loads((model / "config.json").read_text())
    assert config["n_conditions"] == 2 and config["condition_names"] == ["batch_0", "batch_1"]

    run("finetune", "annotation", "--data", sim_h5ad, "--model", model, "--output", tmp_path / "ft",
        "--labels-key", "cell_type", "--batch-key", "batch", "epochs=1", "batch_size=32")
    out = ad.read_h5ad(tmp_path / "ft" / "sim.h5ad")
    assert "atlasformer_label" in out.obs and out.n_obs == 600
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert 0 <= metrics["validation"]["macro_f1"] <= 1

    run("predict", "annotation", "--data", sim_h5ad, "--model", tmp_path / "ft" / "model", "--output", tmp_path / "pred")
    assert "atlasformer_confidence" in ad.read_h5ad(tmp_path / "pred" / "sim.h5ad").obs

    run("embed", "--data", sim_h5ad, "--model", model, "--output", tmp_path / "emb", "--with-x")
    emb = ad.read_h5ad(tmp_path / "emb" / "sim.h5ad")
    assert emb.obsm["X_atlasformer"].shape == (600, 32) and emb.X is not None
    assert hashlib.sha256(sim_h5ad.read_bytes()).hexdigest() == before


def test_errors_are_one_line_with_exit_code_2(tmp_path, sim_h5ad):
    proc = run("finetune", "annotation", "--data", sim_h5ad, "--output", tmp_path / "out", "--labels-key", "nope",
               "--from-scratch", check=False)
    assert proc.returncode == 2 and "labels_key='nope' is not a column" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("finetune", "annotation", "--data", sim_h5ad, "--output", tmp_path, "--labels-key", "cell_type",
               "--from-scratch", check=False)
    assert proc.returncode == 2 and "would be overwritten" in proc.stderr
    proc = run("pretrain", "--data", tmp_path / "missing.h5ad", "--output", tmp_path / "r", check=False)
    assert proc.returncode == 2 and "no such file" in proc.stderr
    proc = run("pretrain", "--data", sim_h5ad, "--output", tmp_path / "r", "lr=fast", check=False)
    assert proc.returncode == 2 and "lr: expected float" in proc.stderr


def test_a_finished_distributed_worker_skips_interpreter_teardown():
    code = ("import atexit, sys; from atlasformer.cli import finished_worker_exit; "
            "atexit.register(lambda: print('teardown ran')); print('done'); "
            "sys.exit(finished_worker_exit() + 3)")
    worker = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "WORLD_SIZE": "2"})
    assert (worker.returncode, worker.stdout) == (0, "done\n")
    single = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "WORLD_SIZE"})
    assert (single.returncode, single.stdout) == (3, "done\nteardown ran\n")
