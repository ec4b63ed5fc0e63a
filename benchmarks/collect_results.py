"""Collect `atlasformer benchmark` output folders into one report: <output>.md and <output>.json.

    python benchmarks/collect_results.py benchmarks/results/public_runs/*/ --output benchmarks/results/public \
        [--checkpoint benchmarks/checkpoints/public-small] [--budgets "..."] [--replace RERUN ...]

``--replace`` merges folders where some methods were rerun alone (``atlasformer benchmark --methods ...``, e.g.
with another learning rate): their rows replace those methods' rows of the run with the same task and dataset,
and the report names the rerun's command.

The JSON holds the date, the machine, every results row, each run's timings / skipped methods / config,
and the pretrained checkpoint's parameters and corpus. The last line printed is a JSON summary:
``{"runs", "rows", "goals_assessed", "goals_met"}``.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

from atlasformer.finetune.benchmark_report import (
    ATLAS_METHODS,
    best_method,
    goal,
    headline_metrics,
    machine_line,
    summary_table,
    write_report,
)


def checkpoint_facts(model: str | None) -> dict:
    """Architecture, parameters and card facts of the benchmarked model (a model folder or a shipped model's name)."""
    if not model:
        return {}
    from atlasformer.checkpoints import SHIPPED_MODELS, shipped_model_folder

    folder = shipped_model_folder(model) if model in SHIPPED_MODELS else Path(model)
    folder = folder / "model" if (folder / "model" / "config.json").exists() else folder
    if not (folder / "config.json").exists():
        return {}
    config = json.loads((folder / "config.json").read_text())
    facts = {"model": model, **{k: config.get(k) for k in ("d_model", "n_layers", "n_heads", "d_ff", "vocab_size")}}
    card = folder / "README.md"
    params = [line for line in card.read_text().splitlines() if "parameters:" in line] if card.exists() else []
    facts["parameters"] = params[0].split("parameters:")[1].strip() if params else None
    corpus = [line for line in card.read_text().splitlines() if line.startswith("- corpus:")] if card.exists() else []
    facts["corpus"] = corpus[0].removeprefix("- corpus:").strip() if corpus else None
    return facts


def replace_methods(rows: list[dict], metas: list[dict], rerun: Path) -> list[dict]:
    """Swap in a rerun's methods (results.json rows and wall times) for the same methods of the run with its task
    and dataset, keeping the methods' order; the run's meta records the rerun's command."""
    new_rows = json.loads((rerun / "results.json").read_text())
    rerun_meta = json.loads((rerun / "timings.json").read_text())
    key = (rerun_meta["task"], rerun_meta["dataset"])
    methods = {r["method"] for r in new_rows}

    def replaced(row: dict) -> bool:
        return (row["task"], row["dataset"]) == key and row["method"] in methods
    at = next((i for i, r in enumerate(rows) if replaced(r)), len(rows))  # no replaced row comes before it
    kept = [r for r in rows if not replaced(r)]
    meta = next((m for m in metas if (m["task"], m["dataset"]) == key), None)
    if meta is None:
        raise SystemExit(f"--replace {rerun}: no run with task {key[0]} and dataset {key[1]} to replace in")
    for method in methods:
        meta.setdefault("timings_s", {})[method] = rerun_meta.get("timings_s", {}).get(method)
        meta.setdefault("replaced", {})[method] = rerun_meta.get("command", str(rerun))
    return kept[:at] + new_rows + kept[at:]


def mean_text(table, method: str, metric: str) -> str:
    return f"{table.loc[(method, metric), 'mean']:.4f}" if (method, metric) in table.index else "-"


def goal_summary(rows: list[dict], metas: list[dict]) -> tuple[list[str], dict]:
    """Each run's goals on its headline metrics (annotation: accuracy and macro-F1; integration: total; imputation:
    Poisson NLL; protein: RMSE; ATAC: AUROC) as a markdown table, one row per metric with its own comparisons
    and the ablations beside, and the counts per pair (a pair meets a goal only on all its headline metrics)."""
    table = summary_table(rows)
    done = set() if table.empty else {(t, d) for t, d, *_ in table.index}
    lines = ["| task | dataset | metric | atlasformer | beats scratch | >= best baseline | scratch | best baseline | "
             "no expression path | expression path alone | zero-shot |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    counts = {"assessed": 0, "beats_scratch": 0, "matches_baseline": 0, "met": 0}
    for meta in sorted(metas, key=lambda m: (m["task"], m["dataset"])):
        key = (meta["task"], meta["dataset"])
        if key not in done:
            continue
        sub = table.loc[key]
        methods = list(dict.fromkeys(sub.index.get_level_values("method")))
        metrics = list(dict.fromkeys(sub.index.get_level_values("metric")))
        if "atlasformer" not in methods:
            lines.append(f"| {key[0]} | {key[1]} | | not assessed: {meta.get('skipped', {}).get('atlasformer', '')} |"
                         " | | | | | | |")
            continue
        if not headline_metrics(key[0], metrics):  # a mapping query without labels: composition only
            continue
        result = goal(sub, key[0], metrics, methods)
        counts["assessed"] += 1
        counts["beats_scratch"] += bool(result["beats_scratch"])
        counts["matches_baseline"] += bool(result["matches_baseline"])
        counts["met"] += bool(result["beats_scratch"] and result["matches_baseline"])
        yes = {True: "yes", False: "**no**", None: "-"}
        for metric in headline_metrics(key[0], metrics):
            per_metric = goal(sub, key[0], [metric], methods)  # this row's own comparison; counts are per pair
            best = best_method(sub, metric, [m for m in methods if m not in ATLAS_METHODS])
            cells = [mean_text(sub, m, metric) for m in ("atlasformer_no_expression", "atlasformer_expression_only",
                                                           "atlasformer_zeroshot")]
            lines.append(f"| {key[0]} | {key[1]} | {metric} | {mean_text(sub, 'atlasformer', metric)} | "
                         f"{yes[per_metric['beats_scratch']]} | {yes[per_metric['matches_baseline']]} | "
                         f"{mean_text(sub, 'atlasformer_scratch', metric)} | "
                         f"{f'{best} {mean_text(sub, best, metric)}' if best else '-'} | " + " | ".join(cells) + " |")
    return lines, counts


def goal_sentence(metas: list[dict], counts: dict) -> str:
    """The report's sentence on the goals: per pair against scratch and the best baseline, or, for a mapping-only
    report (no scratch or ablations there), against the best other method and the lowest ECE."""
    if metas and all(meta["task"] == "mapping" for meta in metas):
        return ("Goal per dataset with query labels (mean over seeds): atlasformer at least as good as the best other "
                f"method on accuracy and macro-F1, and the lowest ECE. Met on {counts['matches_baseline']} of "
                f"{counts['assessed']} datasets. Each section below gives every metric.")
    return ("Goals on the headline metrics (annotation: accuracy and macro-F1; integration: scIB total; "
            f"imputation: Poisson NLL; protein: RMSE; ATAC: AUROC; mean over seeds), over {counts['assessed']} "
            f"assessed task/dataset pairs: atlasformer beats atlasformer_scratch on {counts['beats_scratch']}, "
            f"is at least as good as the best baseline on {counts['matches_baseline']}, both on {counts['met']}. "
            "The ablations beside it: `atlasformer_no_expression` (the head without the expression path), "
            "`atlasformer_expression_only` (the expression path without the embedding). Each section below "
            "gives every metric.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="benchmark output folders")
    parser.add_argument("--output", required=True, help="path without suffix")
    parser.add_argument("--checkpoint", help="pretrained run folder (its model/ is described in the report)")
    parser.add_argument("--budgets", default="", help="a sentence stating the budgets used")
    parser.add_argument("--title", default="atlasformer public benchmark")
    parser.add_argument("--conditions", default="Wall times are indicative: other jobs may have shared the cores.",
                        help="a sentence on how the runs shared the machine")
    parser.add_argument("--replace", nargs="+", default=[], metavar="RERUN",
                        help="benchmark output folders of methods rerun alone (e.g. with other settings): their rows "
                             "replace the same methods' rows of the run with the same task and dataset")
    args = parser.parse_args()

    rows, metas = [], []
    for run in map(Path, args.runs):
        if not (run / "results.json").exists():
            print(f"skipping {run}: no results.json")
            continue
        run_rows = json.loads((run / "results.json").read_text())
        rows += run_rows
        if (run / "timings.json").exists():
            metas.append(json.loads((run / "timings.json").read_text()))
        elif run_rows:  # stopped before its end: results.json holds the seeds that finished
            seeds = sorted({r["seed"] for r in run_rows})
            metas.append({"task": run_rows[0]["task"], "dataset": run_rows[0]["dataset"], "seeds": seeds,
                          "skipped": {}, "partial": f"the run was stopped before its end; only seeds {seeds} "
                                                    "finished, and wall times were not recorded."})
    for rerun in map(Path, args.replace):
        rows = replace_methods(rows, metas, rerun)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_facts(args.checkpoint)
    preamble = ["Measured by `atlasformer benchmark` runs, collected by benchmarks/collect_results.py. "
                f"{args.conditions} Every number below was measured by these runs; none is copied.", ""]
    if args.budgets:
        preamble += [f"Budgets: {args.budgets}.", ""]
    if ckpt:
        preamble += [f"Pretrained model `{ckpt['model']}`: {ckpt.get('parameters')} parameters ({ckpt.get('n_layers')} "
                     f"layers, d_model {ckpt.get('d_model')}, {ckpt.get('n_heads')} heads, vocabulary "
                     f"{ckpt.get('vocab_size')}); corpus: {ckpt.get('corpus')}.", ""]
    goals, counts = goal_summary(rows, metas)
    preamble += [goal_sentence(metas, counts), "", *goals, ""]
    figures = output.parent / f"{output.name}_plots"
    write_report(rows, metas, output.with_suffix(".md"), plots_dir=figures, title=args.title,
                 preamble=preamble)
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_line(),
              "python": platform.python_version(), "budgets": args.budgets, "checkpoint": ckpt,
              "goals": counts, "runs": metas, "rows": rows}
    output.with_suffix(".json").write_text(json.dumps(record, indent=1, default=float))
    print(json.dumps({"runs": len(metas), "rows": len(rows), "goals_assessed": counts["assessed"],
                      "goals_met": counts["met"], "beats_scratch": counts["beats_scratch"],
                      "matches_baseline": counts["matches_baseline"]}))


if __name__ == "__main__":
    main()
