"""`atlasformer benchmark` end to end on small files: results.json rows, report.md, skipped methods."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from atlasformer.checkpoints import export_model_folder
from atlasformer.cli import main
from atlasformer.finetune.benchmark import BenchmarkConfig, dataset_name, result_rows, run_benchmark
from atlasformer.finetune.benchmark_report import summary_table, verdict
from atlasformer.finetune.config import FinetuneConfig
from atlasformer.model_zoo import CellTransformerConfig, CellTransformerForPretraining
from atlasformer.tokenization import CellTokenizer, TokenizerConfig, build_vocab

ROW_KEYS = {"task", "dataset", "method", "metric", "seed", "value"}


@pytest.fixture
def kang_small(tmp_path, shared_data):
    adata = ad.read_h5ad(shared_data("kang_pbmc_8donors.h5ad"))
    donors = adata.obs["batch"].value_counts().index[:3]
    adata = adata[adata.obs["batch"].isin(donors)]
    adata = adata[np.sort(np.random.default_rng(0).choice(adata.n_obs, 700, replace=False))].copy()
    path = tmp_path / "kang_small.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture
def tiny_model(tmp_path, sim_adata):
    vocab = build_vocab([sim_adata])
    tokenizer = CellTokenizer(vocab, TokenizerConfig(max_seq_len=64))
    config = CellTransformerConfig(vocab_size=len(vocab), d_model=16, n_layers=1, n_heads=2, n_bins=tokenizer.config.n_bins,
                                   pad_token_id=vocab.pad_id, cls_token_id=vocab.cls_id, mask_token_id=vocab.mask_id)
    return export_model_folder(CellTransformerForPretraining(config), tokenizer, tmp_path / "tiny_model", {})


def test_dataset_names_follow_formats():
    assert dataset_name("/x/pbmc1k_cite.rna.h5ad") == "pbmc1k_cite"
    assert dataset_name("kang_pbmc_8donors.h5ad") == "kang_pbmc_8donors"


def test_cli_annotation_writes_results_and_report(kang_small, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["benchmark", "--task", "annotation", "--data", str(kang_small), "--labels-key", "cell_type",
                 "--batch-key", "batch", "--methods", "logreg", "pca_knn", "--seeds", "0", "--output", str(out),
                 "min_holdout_cells=100"])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())
    aggregate = [r for r in rows if "fold" not in r]
    assert all(set(r) == ROW_KEYS for r in aggregate)
    assert {(r["method"], r["metric"]) for r in aggregate} == {(m, k) for m in ("logreg", "pca_knn")
                                                                 for k in ("accuracy", "macro_f1")}
    assert all(r["task"] == "annotation" and r["dataset"] == "kang_small" and r["seed"] == 0 for r in rows)
    folds = [r for r in rows if "fold" in r]
    assert folds and set(folds[0]) == ROW_KEYS | {"fold"}
    # the aggregate is the mean over held-out batches
    logreg_acc = [r["value"] for r in folds if r["method"] == "logreg" and r["metric"] == "accuracy"]
    agg = next(r["value"] for r in aggregate if r["method"] == "logreg" and r["metric"] == "accuracy")
    assert agg == pytest.approx(np.mean(logreg_acc)) and agg > 0.6
    report = (out / "report.md").read_text()
    assert "## annotation: kang_small" in report and "| logreg |" in report and "**" in report
    assert "wall time" in report and "Goal not assessed" in report
    assert (out / "annotation_kang_small.png").exists()


def test_cli_says_which_tasks_a_file_cannot_support(kang_small, tmp_path, capsys):
    code = main(["benchmark", "--task", "annotation", "--data", str(kang_small), "--batch-key", "batch",
                 "--output", str(tmp_path / "b")])
    assert code == 2 and "--labels-key" in capsys.readouterr().err
    code = main(["benchmark", "--task", "integration", "--data", str(kang_small), "--labels-key", "cell_type",
                 "--output", str(tmp_path / "b")])
    assert code == 2 and "at least 2 batches" in capsys.readouterr().err
    code = main(["benchmark", "--task", "imputation", "--data", str(kang_small), "--methods", "logreg",
                 "--output", str(tmp_path / "b")])
    assert code == 2 and "do not apply to imputation" in capsys.readouterr().err


def test_modality_and_imputation_rows(shared_data, tmp_path):
    cfg = BenchmarkConfig()
    result = run_benchmark("modality", shared_data("pbmc1k_cite.rna.h5ad"), paired=shared_data("pbmc1k_cite.protein.h5ad"),
                           modality="protein", methods=["mean", "ridge"], seeds=(1,), output=tmp_path / "m", config=cfg)
    values = {(r["method"], r["metric"]): r["value"] for r in result["rows"] if "fold" not in r}
    assert values[("ridge", "rmse")] < values[("mean", "rmse")]
    assert {r["dataset"] for r in result["rows"]} == {"pbmc1k_cite"}
    result = run_benchmark("imputation", shared_data("pbmc1k_cite.rna.h5ad"), methods=["no_denoising", "knn_smoothing"],
                           seeds=(0,), output=tmp_path / "i", config=cfg)
    values = {(r["method"], r["metric"]): r["value"] for r in result["rows"]}
    assert values[("knn_smoothing", "poisson_nll")] < values[("no_denoising", "poisson_nll")]


def test_atlasformer_methods_run_or_are_skipped_with_the_reason(tmp_path, sim_adata, tiny_model):
    data = tmp_path / "sim.h5ad"
    sim_adata.write_h5ad(data)
    cfg = BenchmarkConfig(finetune=FinetuneConfig(epochs=1, batch_size=64), min_holdout_cells=100)
    result = run_benchmark("annotation", data, labels_key="cell_type", batch_key="batch", model=tiny_model,
                           methods=["atlasformer", "atlasformer_scratch", "atlasformer_zeroshot", "pca_knn"], seeds=(0,),
                           output=tmp_path / "a", config=cfg)
    assert {r["method"] for r in result["rows"]} == {"atlasformer", "atlasformer_scratch", "atlasformer_zeroshot", "pca_knn"}
    report = (tmp_path / "a" / "report.md").read_text()
    assert "**Goal met:**" in report or "**Goal not met:**" in report
    # gene names lost (row numbers): the pretrained vocabulary cannot tokenize it; the rest still runs
    lost = sim_adata.copy()
    lost.var_names = [str(i) for i in range(lost.n_vars)]
    lost.write_h5ad(tmp_path / "lost.h5ad")
    result = run_benchmark("annotation", tmp_path / "lost.h5ad", labels_key="cell_type", batch_key="batch",
                           model=tiny_model, methods=["atlasformer_zeroshot", "pca_knn"], seeds=(0,),
                           output=tmp_path / "l", config=cfg)
    assert "gene names were lost" in result["skipped"]["atlasformer_zeroshot"]
    assert {r["method"] for r in result["rows"]} == {"pca_knn"}
    assert "gene names were lost" in (tmp_path / "l" / "report.md").read_text()


def test_verdict_compares_with_scratch_and_best_baseline():
    rows = []
    for method, acc in {"atlasformer": 0.9, "atlasformer_scratch": 0.8, "logreg": 0.92, "pca_knn": 0.85}.items():
        rows += result_rows("annotation", "d", 0, {method: [(None, {"accuracy": acc})]})
    table = summary_table(rows).loc[("annotation", "d")]
    methods = ["atlasformer", "atlasformer_scratch", "logreg", "pca_knn", "atlasformer_expression_only"]
    line = verdict(table, "annotation", ["accuracy"], methods, {})
    assert line.startswith("**Goal not met:**") and "logreg 0.920 (worse)" in line and "(better)" in line
    rows = [dict(r, value=0.95) if r["method"] == "atlasformer" else r for r in rows]
    rows += result_rows("annotation", "d", 0, {"atlasformer_expression_only": [(None, {"accuracy": 0.99})]})
    table = summary_table(rows).loc[("annotation", "d")]
    # an ablation of atlasformer is no baseline to beat
    assert verdict(table, "annotation", ["accuracy"], methods, {}).startswith("**Goal met:**")


def test_methods_after_a_scanpy_baseline_keep_the_thread_limit(kang_small, tmp_path, monkeypatch):
    """numba (scanpy's kernels) sets the OpenMP runtime torch shares to every core when its pool starts; the
    torch methods must still run on `threads` cores, so that side-by-side runs do not oversubscribe them."""
    import torch

    from atlasformer.finetune import benchmark_methods

    seen = []

    def record_threads(split):
        seen.append(torch.get_num_threads())
        return benchmark_methods.ANNOTATION["pca_knn"](split)

    monkeypatch.setitem(benchmark_methods.ANNOTATION, "atlasformer_scratch", record_threads)
    run_benchmark("annotation", kang_small, output=tmp_path / "bench", labels_key="cell_type", batch_key="batch",
                  methods=["logreg", "atlasformer_scratch"], seeds=(0,),
                  config=BenchmarkConfig(threads=1, min_holdout_cells=100))
    assert seen and set(seen) == {1}


@pytest.fixture(scope="module")
def collect():
    """benchmarks/collect_results.py, loaded from its path (benchmarks/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "collect_results.py"
    spec = importlib.util.spec_from_file_location("collect_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_collected_report_summarises_each_goal_with_its_headline_metric(collect):
    def rows(task, dataset, values):
        return [{"task": task, "dataset": dataset, "method": m, "metric": metric, "seed": 0, "value": v}
                for (m, metric), v in values.items()]
    won = rows("integration", "a", {("atlasformer", "bio_conservation"): 0.2, ("atlasformer", "total"): 0.9,
                                    ("atlasformer_scratch", "bio_conservation"): 0.1,
                                    ("atlasformer_scratch", "total"): 0.5, ("pca", "bio_conservation"): 0.1,
                                    ("pca", "total"): 0.8})
    lost = rows("annotation", "b", {("atlasformer", "accuracy"): 0.7, ("atlasformer_scratch", "accuracy"): 0.6,
                                    ("logreg", "accuracy"): 0.95})
    skipped = rows("annotation", "c", {("atlasformer_scratch", "accuracy"): 0.6, ("logreg", "accuracy"): 0.9})
    metas = [{"task": "integration", "dataset": "a"}, {"task": "annotation", "dataset": "b"},
             {"task": "annotation", "dataset": "c", "skipped": {"atlasformer": "no gene names"}}]
    lines, counts = collect.goal_summary(won + lost + skipped, metas)
    assert counts == {"assessed": 2, "beats_scratch": 2, "matches_baseline": 1, "met": 1}
    assert "| annotation | b | accuracy | 0.7000 | yes | **no** | 0.6000 | logreg 0.9500 | - | - | - |" in lines
    assert any(line.startswith("| annotation | c | | not assessed: no gene names") for line in lines)
    assert "| integration | a | total | 0.9000 | yes | yes | 0.5000 | pca 0.8000 | - | - | - |" in lines
    assert "beats atlasformer_scratch on 2" in collect.goal_sentence(metas, counts)
    mapping = collect.goal_sentence([{"task": "mapping", "dataset": "a"}], counts)
    assert "scratch" not in mapping and "lowest ECE. Met on 1 of 2 datasets" in mapping


def test_collect_replaces_a_rerun_method_in_place(collect, tmp_path):
    def row(method, value, dataset="d"):
        return {"task": "annotation", "dataset": dataset, "method": method, "metric": "accuracy", "seed": 0,
                "value": value}
    rows = [row("atlasformer", 0.5), row("logreg", 0.9), row("atlasformer", 0.4, "other")]
    metas = [{"task": "annotation", "dataset": "d", "timings_s": {"atlasformer": 10.0, "logreg": 1.0}},
             {"task": "annotation", "dataset": "other"}]
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    (rerun / "results.json").write_text(json.dumps([row("atlasformer", 0.8)]))
    (rerun / "timings.json").write_text(json.dumps({"task": "annotation", "dataset": "d", "command": "cmd",
                                                    "timings_s": {"atlasformer": 12.0}}))
    merged = collect.replace_methods(rows, metas, rerun)
    assert merged == [row("atlasformer", 0.8), row("logreg", 0.9), row("atlasformer", 0.4, "other")]
    assert metas[0]["timings_s"] == {"atlasformer": 12.0, "logreg": 1.0} and metas[0]["replaced"] == {"atlasformer": "cmd"}
    (rerun / "timings.json").write_text(json.dumps({"task": "annotation", "dataset": "missing", "command": "cmd"}))
    with pytest.raises(SystemExit, match="no run with task annotation and dataset missing"):
        collect.replace_methods(rows, metas, rerun)


def test_mapping_task_scores_every_method_on_held_out_batches(kang_small, tmp_path):
    """`benchmark --task mapping`: the BENCHMARKS.md section 5 metrics per method, from the annotation folds."""
    out = tmp_path / "map"
    code = main(["benchmark", "--task", "mapping", "--data", str(kang_small), "--labels-key", "cell_type",
                 "--batch-key", "batch", "--methods", "logreg", "pca_knn", "scvi_surgery", "--seeds", "0",
                 "--output", str(out), "min_holdout_cells=100", "scvi_epochs=3", "max_holdout_batches=1"])
    assert code == 0
    rows = [r for r in json.loads((out / "results.json").read_text()) if "fold" not in r]
    assert all(r["task"] == "mapping" for r in rows)
    scores = {(r["method"], r["metric"]): r["value"] for r in rows}
    for method in ("logreg", "pca_knn", "scvi_surgery"):
        for metric in ("accuracy", "macro_f1", "ece", "auroc_error", "ilisi_query"):
            assert np.isfinite(scores[(method, metric)]), (method, metric)
        assert 0 <= scores[(method, "ece")] <= 1
    assert scores[("logreg", "accuracy")] > 0.8 and scores[("pca_knn", "accuracy")] > 0.6
    assert "## mapping: kang_small" in (out / "report.md").read_text()


def test_mapping_a_query_file_reports_its_composition(kang_small, tmp_path):
    """With --query, the query's labels are never used: the rows are the predicted composition and unknown fraction."""
    adata = ad.read_h5ad(kang_small)
    donors = adata.obs["batch"].astype(str)
    first = donors == donors.iloc[0]
    reference, query = tmp_path / "reference.h5ad", tmp_path / "query.h5ad"
    adata[~first.to_numpy()].copy().write_h5ad(reference)
    q = adata[first.to_numpy()].copy()
    del q.obs["cell_type"]  # a query without labels
    q.write_h5ad(query)
    out = tmp_path / "map"
    code = main(["benchmark", "--task", "mapping", "--data", str(reference), "--query", str(query), "--labels-key",
                 "cell_type", "--batch-key", "batch", "--methods", "logreg", "pca_knn", "--seeds", "0",
                 "--output", str(out)])
    assert code == 0
    rows = [r for r in json.loads((out / "results.json").read_text()) if "fold" not in r]
    assert {r["dataset"] for r in rows} == {"reference_to_query"}
    fractions = [r["value"] for r in rows if r["method"] == "logreg" and r["metric"].startswith("fraction_")]
    assert sum(fractions) == pytest.approx(1.0) and len(fractions) >= 3
    assert any(r["metric"] == "unknown_fraction" for r in rows)
    method_rows = [line for line in (out / "report.md").read_text().splitlines() if line.startswith(("| logreg", "| pca_knn"))]
    assert len(method_rows) == 2 and not any("**" in line for line in method_rows)  # a composition has no "best"


def test_pretraining_curve_reads_the_mean_over_held_out_donors_not_the_last_fold(tmp_path):
    """benchmarks/pretraining_curve.py once read the last donor's row as the probe figure."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pretraining_curve.py"
    spec = importlib.util.spec_from_file_location("pretraining_curve", path)
    curve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curve)
    rows = [{"method": "atlasformer_zeroshot", "metric": "accuracy", "seed": 0, "value": 0.75},
            *({"method": "atlasformer_zeroshot", "metric": "accuracy", "seed": 0, "value": v, "fold": f}
              for f, v in [("1015", 0.65), ("1256", 0.78), ("1488", 0.80)])]
    (tmp_path / "results.json").write_text(json.dumps(rows))
    assert curve.read_probe(tmp_path) == {"atlasformer_zeroshot": {"accuracy": 0.75}}
    assert curve.read_probe(tmp_path, "1488") == {"atlasformer_zeroshot": {"accuracy": 0.80}}
