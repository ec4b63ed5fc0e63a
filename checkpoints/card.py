"""Model cards: the ``README.md`` of every model folder (docs/formats.md), transformer and VAE alike.

Front matter for the hub, then architecture, tokenizer or inputs, training, task, metrics, a benchmark
table when one was run, a usage snippet, and licence and provenance. Cards name files and folders,
never an absolute local path (:func:`public_name`).
"""

from __future__ import annotations

from pathlib import Path

from atlasformer.model_zoo import count_parameters
from atlasformer.tokenization import CellTokenizer


def model_card(model, tokenizer: CellTokenizer, run_config: dict, summary: dict | None = None,
               benchmark: list[dict] | None = None) -> str:
    """A README.md for the model folder: architecture, parameters, tokenizer, corpus, objectives, benchmark,
    licence and provenance (``run_config["license"]``, ``run_config["converted_from"]``)."""
    cfg = model.config
    summary = summary or {}
    base = run_config.get("base_model")
    lines = [
        "---",
        "library_name: atlasformer",
        f"license: {run_config.get('license', 'apache-2.0')}",
        *([f"base_model: {base}"] if base else []),
        "tags: [single-cell, transcriptomics, atlasformer]",
        "---",
        f"# atlasformer {type(model).__name__}",
        "",
        "## Architecture",
        f"- {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, feed-forward {cfg.d_ff}, "
        f"{'pre' if cfg.norm_first else 'post'}-norm, {cfg.activation}",
        f"- value encoding: {cfg.value_encoding}; pooling: {cfg.pooling}",
        f"- parameters: {count_parameters(model):,}",
        "",
        "## Tokenizer",
        f"- kind: {tokenizer.config.kind}, n_bins {tokenizer.config.n_bins}, max_seq_len {tokenizer.config.max_seq_len}",
        f"- vocabulary: {len(tokenizer.vocab):,} tokens",
        "",
        "## Training",
        f"- {'fine-tuning data' if getattr(cfg, 'task', None) else 'corpus'}: "
        f"{', '.join(public_name(p) for p in run_config.get('data', [])) or 'not recorded'}",
        f"- objectives: {run_config.get('objectives', {})}",
        f"- steps: {run_config.get('max_steps', 'n/a')}",
    ]
    if getattr(cfg, "domain_names", None):  # pretrained with the batch adversary
        lines.insert(-1, f"- batch adversary on {run_config.get('adversary_key')}: {len(cfg.domain_names)} domains")
    if getattr(cfg, "task", None):
        lines += ["", "## Fine-tuned task", f"- task: {cfg.task}", f"- base model: {base or 'none (from scratch)'}"]
        if getattr(cfg, "id2label", None):
            lines.append(f"- labels: {', '.join(map(str, cfg.id2label.values()))}")
    lines += usage_lines(getattr(cfg, "task", None))
    if summary:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    lines += benchmark_table(benchmark)
    lines += ["", "## Licence and provenance", *provenance_lines(run_config), ""]
    return "\n".join(lines)


# the scanpy-shaped function of each fine-tuned task (atlasformer.finetune), for the card's usage snippet
TASK_FUNCTIONS = {"annotation": "annotate", "integration": "integrate", "imputation": "denoise",
                  "modality": "predict_modality"}


def usage_lines(task: str | None) -> list[str]:
    """A usage snippet for the card: load by folder or hub id; apply the task, or embed cells."""
    call = (f"from atlasformer.finetune import {TASK_FUNCTIONS[task]}\n{TASK_FUNCTIONS[task]}(adata, MODEL)"
            if task in TASK_FUNCTIONS else "atlasformer.embed(adata, MODEL)  # obsm['X_atlasformer']")
    return ["", "## Usage", "", "```python", "import anndata as ad", "import atlasformer", "",
            'MODEL = "path/to/this/folder"  # or its hub id', "model, tokenizer = atlasformer.from_pretrained(MODEL)",
            'adata = ad.read_h5ad("cells.h5ad")  # raw counts', *call.split("\n"), "```"]


def public_name(path) -> str:
    """A path as the card may show it: the file or folder name of a local path, never an absolute path."""
    text = str(path)
    if not (Path(text).is_absolute() or Path(text).exists()):
        return text  # a hub id or the shipped model's name
    path = Path(text)
    return f"{path.parent.name}/{path.name}" if path.name == "model" else path.name  # <run>/model: name the run


def benchmark_table(rows: list[dict] | None) -> list[str]:
    """Markdown table of benchmark rows (FORMATS.md results.json), mean and spread over seeds."""
    if not rows:
        return []
    import pandas as pd

    frame = pd.DataFrame([r for r in rows if "fold" not in r])
    stats = frame.groupby(["task", "dataset", "method", "metric"], sort=True)["value"].agg(["mean", "std", "count"])
    lines = ["", "## Benchmark", "", "| task | dataset | method | metric | mean | sd | seeds |", "|---|---|---|---|---|---|---|"]
    for (task, dataset, method, metric), row in stats.iterrows():
        sd = "" if pd.isna(row["std"]) else f"{row['std']:.4f}"
        lines.append(f"| {task} | {dataset} | {method} | {metric} | {row['mean']:.4f} | {sd} | {int(row['count'])} |")
    return lines


def provenance_lines(run_config: dict) -> list[str]:
    source = run_config.get("converted_from")
    if not source:
        return ["Trained with atlasformer; see atlasformer.json for the run config and checksums."]
    lines = [
        f"Converted by atlasformer from a {source['format']} checkpoint: `{public_name(source['source'])}`"
        + (f" (revision `{source['revision']}`)" if source.get("revision") else "")
        + (f", subfolder `{source['subfolder']}`" if source.get("subfolder") else "") + ".",
        f"Licence: {run_config.get('license_note', 'that of the source checkpoint')}.",
        "",
        "| source file | SHA-256 |",
        "|---|---|",
        *[f"| {name} | `{digest}` |" for name, digest in source.get("files", {}).items()],
    ]
    dropped = source.get("weights", {}).get("dropped", [])
    if dropped:
        lines += ["", f"Source weights not carried over ({len(dropped)}): " + ", ".join(f"`{k}`" for k in dropped[:20])]
    return lines


# the AnnData-facing wrapper of each VAE module (atlasformer.finetune), for the card's usage snippet
VAE_WRAPPERS = {"SCVIModule": "SCVIModel", "TOTALVIModule": "TOTALVIModel", "SCANVIModule": "SCANVIModel"}


def vae_card(module, keys: dict, run_config: dict, summary: dict | None = None) -> str:
    """A README.md for a VAE baseline's folder: architecture, inputs (genes, batches, count layer), metrics,
    usage and provenance; ``keys`` are the wrapper's AnnData keys saved in ``config.json``."""
    arch = type(module).__name__
    wrapper = VAE_WRAPPERS.get(arch, arch)
    settings = {k: v for k, v in module.config.to_dict().items() if isinstance(v, (int, float, str, bool))}
    lines = [
        "---",
        "library_name: atlasformer",
        f"license: {run_config.get('license', 'apache-2.0')}",
        "tags: [single-cell, transcriptomics, atlasformer, vae]",
        "---",
        f"# atlasformer {wrapper} ({arch})",
        "",
        "## Architecture",
        *[f"- {k}: {v}" for k, v in settings.items()],
        f"- parameters: {count_parameters(module):,}",
        "",
        "## Inputs",
        f"- genes: {len(keys.get('genes') or [])}; counts from {keys.get('layer') or 'X'}",
        f"- batch key: {keys.get('batch_key')} ({len(keys.get('batches') or [])} batches)",
        "",
        "## Training",
        f"- data: {', '.join(public_name(p) for p in run_config.get('data', [])) or 'not recorded'}",
    ]
    if summary:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    lines += ["", "## Usage", "", "```python", "import anndata as ad", f"from atlasformer.finetune import {wrapper}", "",
              'MODEL = "path/to/this/folder"  # or its hub id', f"model = {wrapper}.load(MODEL)",
              'adata = ad.read_h5ad("cells.h5ad")  # raw counts', 'adata.obsm["X_latent"] = model.embed(adata)', "```"]
    lines += ["", "## Licence and provenance", *provenance_lines(run_config), ""]
    return "\n".join(lines)
