"""Benchmark rows -> report.md: mean +- std tables per task and dataset, the best method in bold, wall time,
the verdict on atlasformer, skipped methods with reasons, and one bar plot per task and dataset."""

from __future__ import annotations

import datetime
import os
import platform
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from atlasformer.tokenization.outputs import atomic_path

from .plots import new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ATLAS_METHODS = ("atlasformer", "atlasformer_scratch", "atlasformer_zeroshot", "atlasformer_no_expression",
                 "atlasformer_expression_only")
"""atlasformer and its ablations; every other method is a baseline."""
HEADLINE = {"annotation": ("accuracy", "macro_f1"), "integration": ("total",), "imputation": ("poisson_nll",),
            "modality": ("rmse", "auroc"), "mapping": ("accuracy", "macro_f1", "ece")}
"""The metrics a task's goal is judged on (protein's RMSE or ATAC's AUROC, whichever the run reports)."""
LOWER_IS_BETTER = frozenset({"poisson_nll", "rmse", "ece"})


def descriptive(metric: str) -> bool:
    """A description with no better direction: a mapped query's unknown fraction and predicted composition."""
    return metric == "unknown_fraction" or metric.startswith("fraction_")


def summary_table(rows: list[dict]) -> pd.DataFrame:
    """Aggregate rows (no ``fold`` key) -> DataFrame indexed by (task, dataset, method, metric) with mean, std, n."""
    frame = pd.DataFrame([r for r in rows if "fold" not in r])
    if frame.empty:
        return frame
    grouped = frame.groupby(["task", "dataset", "method", "metric"], sort=False)["value"]
    return pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=0), "n": grouped.count()})


def best_method(table: pd.DataFrame, metric: str, methods: list[str]) -> str | None:
    """The method with the best mean on ``metric`` among ``methods`` (lower is better for NLL and RMSE)."""
    means = {m: table.loc[(m, metric), "mean"] for m in methods if (m, metric) in table.index}
    means = {m: v for m, v in means.items() if np.isfinite(v)}
    if not means:
        return None
    pick = min if metric in LOWER_IS_BETTER else max
    return pick(means, key=means.get)


def better(a: float, b: float, metric: str, *, or_equal: bool = False) -> bool:
    if metric in LOWER_IS_BETTER:
        a, b = -a, -b
    return a >= b if or_equal else a > b


def headline_metrics(task: str, metrics: list[str]) -> list[str]:
    headline = [m for m in metrics if m in HEADLINE.get(task, ())]
    return headline if headline or task == "mapping" else metrics[:1]  # mapping without query labels: none


def goal(table: pd.DataFrame, task: str, metrics: list[str], methods: list[str]) -> dict:
    """Whether atlasformer beats atlasformer_scratch and is at least as good as the best baseline on the task's
    headline metrics (mean over seeds): ``{"beats_scratch", "matches_baseline"}`` (None: not assessable) and the
    comparisons as text (``parts``)."""
    baselines = [m for m in methods if m not in ATLAS_METHODS]
    beats = matches = None
    parts = []
    for metric in headline_metrics(task, metrics):
        ours = table.loc[("atlasformer", metric), "mean"]
        if "atlasformer_scratch" in methods:
            scratch = table.loc[("atlasformer_scratch", metric), "mean"]
            wins = better(ours, scratch, metric)
            beats = wins if beats is None else beats and wins
            parts.append(f"{metric}: {ours:.3f} vs scratch {scratch:.3f} ({'better' if wins else 'not better'})")
        best = best_method(table, metric, baselines)
        if best is not None:
            value = table.loc[(best, metric), "mean"]
            ok = better(ours, value, metric, or_equal=True)
            matches = ok if matches is None else matches and ok
            name = "" if "atlasformer_scratch" in methods else f"{metric}: {ours:.4f} "  # else named with scratch
            parts.append(f"{name}vs best baseline {best} {value:.{4 if name else 3}f} ({'at least as good' if ok else 'worse'})")
    return {"beats_scratch": beats, "matches_baseline": matches, "parts": parts}


def verdict(table: pd.DataFrame, task: str, metrics: list[str], methods: list[str], skipped: dict) -> str:
    """The line stating whether atlasformer beats atlasformer_scratch and matches the best baseline on the task's
    headline metrics (mean over seeds)."""
    if "atlasformer" not in methods:
        reason = skipped.get("atlasformer", "not requested")
        return f"**Goal not assessed:** atlasformer (pretrained + fine-tuned) did not run: {reason}"
    result = goal(table, task, metrics, methods)
    if task == "mapping":  # no scratch here: the goal is the best accuracy and macro-F1 and the lowest ECE
        if not headline_metrics(task, metrics):
            return ("**Goal not assessed:** the query has no labels; the table gives each method's predicted "
                    "composition and unknown fraction.")
        met = "met" if result["matches_baseline"] else "not met"
        return (f"**Goal {met}:** atlasformer at least as good as the best baseline on accuracy and macro-F1 and "
                f"the best calibrated (lowest ECE), mean over seeds: " + "; ".join(result["parts"]) + ".")
    parts = result["parts"] + ([] if "atlasformer_scratch" in methods else ["atlasformer_scratch did not run"])
    if result["beats_scratch"] and result["matches_baseline"]:
        head = ("**Goal met:** atlasformer (pretrained + fine-tuned) beats atlasformer_scratch and is at least as good "
                "as the best baseline on the headline metrics (mean over seeds)")
    else:
        head = ("**Goal not met:** atlasformer (pretrained + fine-tuned) does not both beat atlasformer_scratch and "
                "match the best baseline on the headline metrics (mean over seeds)")
    return head + ": " + "; ".join(parts) + "."


def task_section(task: str, dataset: str, table: pd.DataFrame, meta: dict, plot: Path | None, report_dir: Path) -> list[str]:
    sub = table.loc[(task, dataset)]
    methods = list(dict.fromkeys(sub.index.get_level_values("method")))
    metrics = list(dict.fromkeys(sub.index.get_level_values("metric")))
    timings = meta.get("timings_s", {})
    seeds = meta.get("seeds", [])
    lines = [f"## {task}: {dataset}", ""]
    facts = [f"{meta.get('n_cells', '?')} cells x {meta.get('n_genes', '?')} genes", f"seeds {seeds}"]
    if meta.get("modality"):
        facts.append(f"modality {meta['modality']}")
    ranked = [m + (" (lower is better)" if m in LOWER_IS_BETTER else "") for m in metrics if not descriptive(m)]
    notes = [f"best in bold ({', '.join(ranked)})"] if ranked else []
    if len(ranked) < len(metrics):
        notes.append("the unknown fraction and composition describe, none is best")
    lines += [", ".join(facts) + ". Mean +- std over seeds; " + "; ".join(notes) + ".", ""]
    header = "| method | " + " | ".join(metrics) + " | wall time (s, all seeds) |"
    lines += [header, "|" + "---|" * (len(metrics) + 2)]
    best = {metric: None if descriptive(metric) else best_method(sub, metric, methods) for metric in metrics}
    for method in methods:
        cells = []
        for metric in metrics:
            if (method, metric) not in sub.index:
                cells.append("")
                continue
            mean, std = sub.loc[(method, metric), "mean"], sub.loc[(method, metric), "std"]
            text = f"{mean:.3f} +- {std:.3f}"
            cells.append(f"**{text}**" if best[metric] == method else text)
        wall = timings.get(method)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {wall:.1f} |" if wall is not None else
                     f"| {method} | " + " | ".join(cells) + " | |")
    lines += ["", verdict(sub, task, metrics, methods, meta.get("skipped", {})), ""]
    if meta.get("partial"):
        lines += [f"Partial: {meta['partial']}", ""]
    for method, command in meta.get("replaced", {}).items():
        lines += [f"`{method}` comes from a rerun of that method alone: `{command}`", ""]
    if meta.get("skipped"):
        lines += ["Not run:"] + [f"- `{k}`: {v}" for k, v in meta["skipped"].items()] + [""]
    if meta.get("scib_disabled"):
        lines += [f"scib-metrics disabled on this dataset: {', '.join(meta['scib_disabled'])}.", ""]
    if plot is not None:
        lines += [f"![{task} {dataset}]({os.path.relpath(plot, report_dir)})", ""]
    return lines


def plot_task(table: pd.DataFrame, task: str, dataset: str, path: Path | None = None) -> Figure:
    """One bar panel per metric: mean over seeds with std error bars, one bar per method; saved to ``path`` if given."""
    sub = table.loc[(task, dataset)]
    methods = list(dict.fromkeys(sub.index.get_level_values("method")))
    metrics = list(dict.fromkeys(sub.index.get_level_values("metric")))
    fig = new_figure(3.2 * len(metrics), 0.35 * len(methods) + 1.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        present = [m for m in methods if (m, metric) in sub.index]
        means = [sub.loc[(m, metric), "mean"] for m in present]
        stds = [sub.loc[(m, metric), "std"] for m in present]
        colors = ["tab:red" if m.startswith("atlasformer") else "tab:blue" for m in present]
        ax.barh(range(len(present)), means, xerr=stds, color=colors)
        ax.set_yticks(range(len(present)), present if ax is axes[0][0] else [""] * len(present))
        ax.invert_yaxis()
        ax.set_title(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""), fontsize=9)
    fig.suptitle(f"{task}: {dataset}", fontsize=10)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path, dpi=90)


def machine_line(shared_note: bool = True) -> str:
    line = (f"{datetime.date.today().isoformat()}, {platform.node() or 'unknown host'}, {platform.machine()}, "
            f"{os.cpu_count()} CPU cores, Python {platform.python_version()}")
    if shared_note:
        line += "; other jobs may have shared the cores, so wall times are indicative only"
    return line


def write_report(rows: list[dict], metas: list[dict], path: str | Path, *, plots_dir: str | Path | None = None,
                 title: str = "atlasformer benchmark", preamble: list[str] | None = None) -> Path:
    """Write report.md for every (task, dataset) in ``rows``; ``metas`` carry timings, skips and sizes."""
    path = Path(path)
    table = summary_table(rows)
    by_key = defaultdict(dict)
    for meta in metas:
        by_key[(meta["task"], meta["dataset"])] = meta
    lines = [f"# {title}", "", machine_line() + ".", ""] + list(preamble or [])
    if table.empty:
        lines += ["No results: every method was skipped.", ""]
        for meta in metas:
            lines += [f"- `{k}`: {v}" for k, v in meta.get("skipped", {}).items()]
    keys = list(dict.fromkeys((t, d) for t, d, *_ in table.index)) if not table.empty else []
    for task, dataset in keys:
        plot = Path(plots_dir) / f"{task}_{dataset}.png" if plots_dir else None
        if plot is not None:
            plot_task(table, task, dataset, plot)
        lines += task_section(task, dataset, table, by_key.get((task, dataset), {}), plot, path.parent)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
