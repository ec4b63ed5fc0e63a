"""Issue 13, items 13, 17 and 21: hub errors without network, plots that leave matplotlib's backend alone,
and held-out cells on small corpora.

- Item 13: `hub push` and hub-id resolution with an unreachable hub (HF_ENDPOINT at a port that refuses
  connections) or HF_HUB_OFFLINE=1 end in one-line CheckpointErrors naming the endpoint or both readings
  of ``mymodels/run1`` (a missing folder, an unreachable hub id); no network is used.
- Item 17: importing and calling the plots never switches the backend; every plot returns a Figure;
  the confusion matrix shows counts and the accuracy, the imputation chart one axes per metric with its
  direction, the protein scatter the y = x line, which proteins it shows and a baseline when given.
- Item 21: in-memory and streamed splits hold out round(eval_fraction * cells) cells, within a block when
  needed, deterministically, and the two parts cover every cell once.
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from hub_cache import hub_cache  # noqa: F401  (fixture)
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError
from matplotlib.figure import Figure

import atlasformer
from atlasformer.checkpoints import CheckpointError, export_model_folder, push_model_folder, resolve_model
from atlasformer.cli import main
from atlasformer.finetune import plots
from atlasformer.finetune.metrics import plot_confusion_matrix
from atlasformer.model_zoo import CellTransformerConfig, CellTransformerForPretraining
from atlasformer.pretrain.train import split_rows
from atlasformer.tokenization import CellTokenizer, GeneVocab, TokenizerConfig
from atlasformer.tokenization.streaming import split_blocks

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connections are refused at once


# ------------------------------------------------------------------------------------ item 13: hub
@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """Online, with an empty cache and HF_ENDPOINT at a port that refuses connections: every hub request fails fast.

    huggingface_hub reads these variables at import into ``huggingface_hub.constants``, so both are patched.
    """
    home = tmp_path / "hf_home"
    (home / "hub").mkdir(parents=True)
    env = {"HF_ENDPOINT": UNREACHABLE, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "0",
           "HF_TOKEN": "hf_not_a_real_token"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", UNREACHABLE + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("ATLASFORMER_CACHE", raising=False)
    return UNREACHABLE


@pytest.fixture
def model_folder(tmp_path):
    vocab = GeneVocab([f"ENSG{i:011d}" for i in range(20)])
    config = CellTransformerConfig(vocab_size=len(vocab), d_model=16, n_layers=1, n_heads=2, n_bins=11, dropout=0.0)
    model = CellTransformerForPretraining(config).eval()
    tokenizer = CellTokenizer(vocab, TokenizerConfig(n_bins=11, max_seq_len=32))
    return export_model_folder(model, tokenizer, tmp_path / "model", {"data": ["sim.h5ad"], "objectives": {"mv": 1}})


def test_hub_push_without_network_is_a_one_line_error_naming_the_endpoint(model_folder, unreachable_hub, capsys):
    expected = (r"^could not reach the Hugging Face hub at http://127\.0\.0\.1:9 \(ConnectError: .+\); check the "
                r"network or HF_ENDPOINT, or use --dry-run to validate without uploading\.$")
    with pytest.raises(CheckpointError, match=expected):
        push_model_folder(model_folder, "atlas-org/tiny")
    assert main(["hub", "push", str(model_folder), "atlas-org/tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not reach the Hugging Face hub at http://127.0.0.1:9") and "\n" not in err
    assert "Traceback" not in err


def test_hub_push_refused_by_the_hub_says_to_log_in(model_folder, unreachable_hub, monkeypatch):
    def refuse(self, repo_id, **kw):
        response = SimpleNamespace(status_code=401, headers={}, request=None)
        raise HfHubHTTPError("401 Client Error: Unauthorized for url", response=response)

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(CheckpointError, match=r"refused the upload to atlas-org/tiny \(HfHubHTTPError: 401.*hf auth login"):
        push_model_folder(model_folder, "atlas-org/tiny")


def test_missing_folder_with_one_slash_names_both_readings_when_the_hub_is_unreachable(tmp_path, unreachable_hub,
                                                                                       monkeypatch, sim_h5ad, capsys):
    monkeypatch.chdir(tmp_path)
    expected = r"^no such folder mymodels/run1; as a hub id it could not be reached \(http://127\.0\.0\.1:9: ConnectError"
    with pytest.raises(CheckpointError, match=expected):
        atlasformer.from_pretrained("mymodels/run1")
    with pytest.raises(CheckpointError, match=expected):
        resolve_model("mymodels/run1")
    assert main(["embed", "--data", str(sim_h5ad), "--model", "mymodels/run1", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no such folder mymodels/run1; as a hub id it could not be reached") and "\n" not in err


def test_missing_folder_with_one_slash_names_both_readings_offline(tmp_path, hub_cache, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"^no such folder mymodels/run1; as a hub id it is not in the local "
                                              r"Hugging Face cache .* HF_HUB_OFFLINE=1 forbids downloads"):
        resolve_model("mymodels/run1")


# ---------------------------------------------------------------------------------- item 17: plots
BACKEND_PROBE = """
import json, sys, matplotlib
import numpy as np
from pathlib import Path
matplotlib.use("svg")  # a backend the plots must not replace (they used to force Agg)
before = matplotlib.get_backend()
import atlasformer.finetune
from atlasformer.finetune import plots
from atlasformer.finetune.metrics import plot_confusion_matrix
after_import = matplotlib.get_backend()
out = Path(sys.argv[1])
plots.metric_bars({"a": {"m": 1.0}}, out / "bars.png", "t")
plot_confusion_matrix(np.array(["x", "y"]), np.array(["x", "x"]), out / "cm.png")
plots.roc_curve_plot(np.array([0, 1, 1, 0]), np.array([0.1, 0.8, 0.6, 0.3]), out / "roc.png")
plots.predicted_vs_observed(np.eye(3), np.eye(3), ["p", "q", "r"], out / "scatter.png")
print(json.dumps([before, after_import, matplotlib.get_backend()]))
"""


def test_importing_and_calling_the_plots_keeps_the_matplotlib_backend(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    done = subprocess.run([sys.executable, "-c", BACKEND_PROBE, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    before, after_import, after_calls = json.loads(done.stdout.strip().splitlines()[-1])
    assert before == after_import == after_calls == "svg"


def test_confusion_matrix_shows_counts_and_accuracy(tmp_path):
    true = np.array(["B"] * 6 + ["T"] * 4)
    pred = np.array(["B"] * 5 + ["T"] + ["T"] * 4)
    fig = plot_confusion_matrix(true, pred, tmp_path / "cm.png", "validation cells")
    assert isinstance(fig, Figure) and (tmp_path / "cm.png").stat().st_size > 1000
    ax = fig.axes[0]
    assert "accuracy 0.900" in ax.get_title() and "validation cells" in ax.get_title()
    assert sorted(t.get_text() for t in ax.texts) == sorted(["5", "1", "0", "4"])


def test_imputation_chart_has_one_axes_per_metric_with_its_direction():
    values = {"atlasformer": {"poisson_nll": 1.2, "pearson_log1p": 0.6},
              "no_denoising": {"poisson_nll": 1.5, "pearson_log1p": 0.4}}
    fig = plots.metric_bars(values, None, "molecular cross-validation", lower_is_better=("poisson_nll",))
    assert isinstance(fig, Figure)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 2
    assert "lower is better" in titles[0] and "higher is better" in titles[1]


def test_protein_scatter_draws_y_equals_x_says_which_proteins_and_the_baseline(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 40))
    true = (z - z.mean(0)) / z.std(0) * np.linspace(0.1, 2, 40)  # protein j's variance grows with j
    pred = true + rng.normal(size=true.shape) * 0.3
    fig = plots.predicted_vs_observed(true, pred, [f"P{i}" for i in range(40)], tmp_path / "p.png",
                                      feature_kind="proteins")
    assert isinstance(fig, Figure) and (tmp_path / "p.png").exists()
    drawn = [ax for ax in fig.axes if ax.axison]
    assert len(drawn) == 12 and fig._suptitle.get_text() == "12 of 40 proteins, the most variable"
    assert all(any(line.get_label() == "y = x" for line in ax.get_lines()) for ax in drawn)
    assert drawn[0].get_title().startswith("P39")  # the most variable first
    baseline = np.broadcast_to(true.mean(0), true.shape)
    fig = plots.predicted_vs_observed(true[:, :3], pred[:, :3], ["a", "b", "c"], feature_kind="proteins",
                                      baseline=baseline[:, :3], baseline_label="mean baseline")
    assert fig._suptitle.get_text() == "all 3 proteins"
    assert len(fig.axes[0].collections) == 2 and "mean baseline: RMSE" in fig.axes[0].get_title()


def test_roc_curve_returns_a_figure():
    fig = plots.roc_curve_plot(np.array([0, 1, 1, 0]), np.array([0.1, 0.8, 0.6, 0.3]))
    assert isinstance(fig, Figure) and len(fig.axes) == 1 and "AUROC 1.000" in fig.axes[0].get_legend().get_texts()[0].get_text()


# ------------------------------------------------------------------------- item 21: held-out cells
def assert_partition(train: np.ndarray, held: np.ndarray, n_cells: int) -> None:
    assert not set(train.tolist()) & set(held.tolist())
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(n_cells))


def test_split_rows_holds_out_what_was_asked():
    train, held = split_rows(600, 0.05, 0)
    assert len(held) == 30
    assert_partition(train, held, 600)
    train, held = split_rows(200_000, 0.05, 3)
    assert len(held) == 10_000
    assert_partition(train, held, 200_000)
    assert len(split_rows(10, 0.01, 0)[1]) == 1  # asked for some: at least one cell
    assert len(split_rows(10, 0.0, 0)[1]) == 0
    assert np.array_equal(split_rows(600, 0.05, 0)[1], split_rows(600, 0.05, 0)[1])
    assert not np.array_equal(split_rows(600, 0.05, 0)[1], split_rows(600, 0.05, 1)[1])


def cells_of(blocks: np.ndarray, shard_starts: np.ndarray) -> np.ndarray:
    return np.concatenate([np.arange(shard_starts[s] + a, shard_starts[s] + b) for s, a, b in blocks])


def blocks_of(shard_sizes: list[int], block_size: int) -> np.ndarray:
    """``(shard, start, stop)`` blocks as tokenization.streaming.corpus_blocks cuts them."""
    return np.array([(i, a, min(a + block_size, n)) for i, n in enumerate(shard_sizes)
                     for a in range(0, n, block_size)], dtype=np.int64)


@pytest.mark.parametrize("shard_sizes", [[600], [300, 300], [1000] * 40])
def test_streamed_split_holds_out_the_asked_cells_within_a_block(shard_sizes):
    blocks = blocks_of(shard_sizes, 256)
    starts = np.concatenate([[0], np.cumsum(shard_sizes)])
    n_cells = int(starts[-1])
    train, held = split_blocks(blocks, 0.05, 0)
    assert len(cells_of(held, starts)) == round(0.05 * n_cells)
    assert_partition(cells_of(train, starts), cells_of(held, starts), n_cells)
    assert (train[:, 2] > train[:, 1]).all() and (held[:, 2] > held[:, 1]).all()  # no empty blocks
    again = split_blocks(blocks, 0.05, 0)
    assert np.array_equal(train, again[0]) and np.array_equal(held, again[1])
    assert len(split_blocks(blocks, 0.0, 0)[1]) == 0
