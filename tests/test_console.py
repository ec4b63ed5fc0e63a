"""Console output (issue 13, items 15 and 16): messages go through the "atlasformer" logger, whose level
``atlasformer.settings.verbosity`` and the CLI's -q / -v set; each fact is said once and every number named;
progress bars (tqdm.auto) show in pipes too, at a low refresh rate, and not when quiet."""

import logging
import os
import sys

import numpy as np
import pytest
import torch

import atlasformer.settings as settings
from atlasformer.api import cell_embeddings
from atlasformer.cli import main, printed_metrics
from atlasformer.finetune import FinetuneConfig
from atlasformer.finetune.common import tokenize_for_model
from atlasformer.finetune.fit import fit
from atlasformer.model_zoo import CellTransformerConfig, CellTransformerForPretraining
from atlasformer.tokenization import CellTokenizer, GeneVocab, TokenizerConfig
from atlasformer.tokenization.console import PIPE_REFRESH_SECONDS, progress_bar


@pytest.fixture(autouse=True)
def default_verbosity():
    settings.verbosity = 1
    yield
    settings.verbosity = 1


@pytest.fixture
def pair(sim_adata):
    vocab = GeneVocab(list(sim_adata.var_names))
    config = CellTransformerConfig(vocab_size=len(vocab), d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=65,
                                   pad_token_id=vocab.pad_id)
    return CellTransformerForPretraining(config).eval(), CellTokenizer(vocab, TokenizerConfig(max_seq_len=64))


# ------------------------------------------------------------------------------------ item 15: messages
def test_verbosity_sets_the_logger_level_and_messages_reach_stderr_once(capsys):
    stage_logger = logging.getLogger("atlasformer.finetune.example")
    settings.install_console_handler()  # a second install adds no second handler
    root_handler = logging.StreamHandler(sys.stderr)  # as a library's logging.basicConfig() adds
    logging.getLogger().addHandler(root_handler)
    try:
        stage_logger.info("one line")  # still printed once
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert capsys.readouterr().err == "one line\n"
    settings.verbosity = 0
    stage_logger.info("hidden")
    stage_logger.warning("a warning")
    assert capsys.readouterr().err == "a warning\n"
    settings.verbosity = 2
    assert logging.getLogger("atlasformer").level == logging.DEBUG and settings.verbosity == 2
    with pytest.raises(ValueError, match="verbosity must be 0"):
        settings.verbosity = 3


@pytest.mark.parametrize("argv, verbosity", [(["-q", "embed"], 0), (["embed", "-q"], 0), (["embed", "--verbose"], 2),
                                             (["embed"], 1)])
def test_quiet_and_verbose_flags_before_or_after_the_subcommand(argv, verbosity, tmp_path, sim_h5ad, capsys):
    assert main([*argv, "--data", str(sim_h5ad), "--output", str(tmp_path / "out")]) == 2  # no --model: refused
    assert settings.verbosity == verbosity
    assert "embed needs --model" in capsys.readouterr().err


def test_a_files_tokenization_report_is_shown_once(sim_adata, pair, capsys):
    _, tokenizer = pair
    for _ in range(3):  # pretraining, then two heads, on the same file
        tokenize_for_model(sim_adata, tokenizer, source="reported_once.h5ad")
    err = capsys.readouterr().err
    assert err.count("reported_once.h5ad: 600/600 cells kept") == 1, err


def test_fine_tuning_names_the_validation_metric(capsys):
    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(2, 1)

        def forward(self, x, y):
            return type("Output", (), {"loss": torch.nn.functional.mse_loss(self.head(x).squeeze(1), y)})()

    x, y = torch.randn(16, 2), torch.randn(16)

    def validate(model):
        mse = float(model(x, y).loss)
        return -mse, {"mse": mse}

    fit(Regression(), 16, lambda rows: {"x": x[rows], "y": y[rows]}, validate,
        FinetuneConfig(max_steps=2, eval_every=1, batch_size=8, lr=1e-3, cpu=True), metric="mse", lower_is_better=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if "validation" in line]
    assert len(lines) == 2 and all(" validation mse " in line and "(lower is better)" in line for line in lines), lines
    assert not any("score" in line for line in lines), lines


def test_printed_metrics_name_the_baselines_and_leave_the_tables_to_metrics_json():
    validation = {"poisson_nll": 1.27, "no_denoising": {"poisson_nll": 1.59}, "mean_baseline": {"rmse": 1.08},
                  "per_class": {"t": {"f1-score": 1.0}}, "n_val": 45,
                  "scib": {"unintegrated_pca": {"total": 0.60, "kbet_per_label": 0.0},
                           "atlasformer": {"total": 0.76}}, "scib_total": 0.76}
    assert printed_metrics(validation) == {"poisson_nll": 1.27, "no_denoising.poisson_nll": 1.59,
                                           "mean_baseline.rmse": 1.08, "n_val": 45,
                                           "scib.unintegrated_pca.total": 0.60, "scib_total": 0.76}


def test_cpu_pretraining_says_neither_strategy_nor_deepspeed_accelerator(tmp_path, sim_h5ad, monkeypatch, capsys):
    if not torch.cuda.is_available():  # DeepSpeed, imported by accelerate, reads it instead of warning
        monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert main(["pretrain", "--data", str(sim_h5ad), "--output", str(tmp_path / "run"), "model=tiny",
                 "max_steps=2", "eval_every=1", "batch_size=16", "tokenizer.max_seq_len=32"]) == 0
    out, err = capsys.readouterr()
    assert "model: " in err and "strategy" not in err and "MFU" not in err, err
    assert out.strip() == f"model folder: {tmp_path / 'run' / 'model'}"  # the result, once
    if not torch.cuda.is_available():
        assert os.environ["DS_ACCELERATOR"] == "cpu"


# ------------------------------------------------------------------------------------ item 16: progress bars
def test_embedding_shows_a_progress_bar_in_a_pipe_unless_quiet(sim_adata, pair, capsys):
    first = cell_embeddings(sim_adata, pair, chunk_size=256)
    err = capsys.readouterr().err  # capsys' stderr is no terminal, as a pipe
    assert "%|" in err and "600/600" in err and "cells" in err, err
    settings.verbosity = 0
    second = cell_embeddings(sim_adata, pair, chunk_size=256)
    assert capsys.readouterr().err == ""
    np.testing.assert_array_equal(first, second)


def test_a_bar_in_a_pipe_redraws_rarely_and_only_on_the_main_process(monkeypatch):
    assert progress_bar(10, desc="x").mininterval == PIPE_REFRESH_SECONDS
    assert progress_bar(10, desc="x", main_process=False).disable
    monkeypatch.setenv("RANK", "1")
    assert progress_bar(10, desc="x").disable
