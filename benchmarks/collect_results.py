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
    machine_line,
    summary_table,
    verdict,
    write_report,
)


def checkpoint_facts(folder: Path | None) -> dict:
    if folder is None or not (folder / "model" / "config.json").exists():
        return {}
    config = json.loads((folder / "model" / "config.json").read_text())
    facts = {k: config.get(k) for k in ("d_model", "n_layers", "n_heads", "d_ff", "vocab_size")}
    card = folder / "model" / "README.md"
    params = [line for line in card.read_text().splitlines() if "parameters:" in line] if card.exists() else []
    facts["parameters"] = params[0].split("parameters:")[1].strip() if params else None
    for name in ("pretrain_seconds.txt", "corpus.txt"):
        if (folder / name).exists():
            facts[name.split(".")[0]] = (folder / name).read_text().split()
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
    return f"{table.loc[(method, metric), 'mean']:.3f}" if (method, metric) in table.index else "-"


def goal_summary(rows: list[dict], metas: list[dict]) -> tuple[list[str], int, int]:
    """Each run's goal verdict and headline metric (integration: total; else the first) as a markdown table,
    and the counts of goals assessed and met."""
    table = summary_table(rows)
    done = set() if table.empty else {(t, d) for t, d, *_ in table.index}
    lines = ["| task | dataset | goal | headline metric: atlasformer / scratch / best baseline |", "|---|---|---|---|"]
    assessed = met = 0
    for meta in sorted(metas, key=lambda m: (m["task"], m["dataset"])):
        key = (meta["task"], meta["dataset"])
        if key not in done:
            continue
        sub = table.loc[key]
        methods = list(dict.fromkeys(sub.index.get_level_values("method")))
        metrics = list(dict.fromkeys(sub.index.get_level_values("metric")))
        line = verdict(sub, metrics, methods, meta.get("skipped", {}))
        outcome = line.split(":**")[0].removeprefix("**Goal ")
        assessed += outcome != "not assessed"
        met += outcome == "met"
        metric = "total" if "total" in metrics else metrics[0]
        best = best_method(sub, metric, [m for m in methods if m not in ATLAS_METHODS])
        lines.append(f"| {key[0]} | {key[1]} | {outcome} | {metric}: {mean_text(sub, 'atlasformer', metric)} / "
                     f"{mean_text(sub, 'atlasformer_scratch', metric)} / "
                     f"{f'{best} {mean_text(sub, best, metric)}' if best else '-'} |")
    return lines, assessed, met


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
    ckpt = checkpoint_facts(Path(args.checkpoint)) if args.checkpoint else {}
    preamble = ["Measured by `atlasformer benchmark` runs, collected by benchmarks/collect_results.py. "
                f"{args.conditions} Every number below was measured by these runs; none is copied.", ""]
    if args.budgets:
        preamble += [f"Budgets: {args.budgets}.", ""]
    if ckpt:
        preamble += [f"Pretrained model: {ckpt.get('parameters')} parameters ({ckpt.get('n_layers')} layers, d_model "
                     f"{ckpt.get('d_model')}, {ckpt.get('n_heads')} heads, vocabulary {ckpt.get('vocab_size')}), "
                     f"pretrained in {' '.join(ckpt.get('pretrain_seconds', ['?', 's'])[-2:])} on "
                     f"{len(ckpt.get('corpus', []))} human RNA files.", ""]
    goals, assessed, met = goal_summary(rows, metas)
    preamble += [f"Goal (atlasformer pretrained + fine-tuned beats atlasformer_scratch and is at least as good as the "
                 f"best baseline on every metric, mean over seeds): met on {met} of {assessed} assessed task/dataset "
                 "pairs. Each section below gives every metric.", "", *goals, ""]
    figures = output.parent / f"{output.name}_plots"
    write_report(rows, metas, output.with_suffix(".md"), plots_dir=figures, title=args.title,
                 preamble=preamble)
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_line(),
              "python": platform.python_version(), "budgets": args.budgets, "checkpoint": ckpt,
              "goals": {"assessed": assessed, "met": met}, "runs": metas, "rows": rows}
    output.with_suffix(".json").write_text(json.dumps(record, indent=1, default=float))
    print(json.dumps({"runs": len(metas), "rows": len(rows), "goals_assessed": assessed, "goals_met": met}))


if __name__ == "__main__":
    main()
