"""Model folders: export a trained model with its tokenizer, manifest and card; load one back.

The model (``config.json``, ``model.safetensors``) is saved by model_zoo and the tokenizer
(``vocab.json``, ``tokenizer_config.json``, ``gene_medians.json``) by tokenization, side by side, as
transformers saves a model and its tokenizer. See docs/formats.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from atlasformer.model_zoo import CheckpointError, atomic_folder, count_parameters, load_model, write_manifest
from atlasformer.tokenization import CellTokenizer


def model_card(model, tokenizer: CellTokenizer, run_config: dict, summary: dict | None = None) -> str:
    """A README.md for the model folder: architecture, parameters, tokenizer, corpus, objectives."""
    cfg = model.config
    summary = summary or {}
    lines = [
        "---",
        "library_name: atlasformer",
        "license: apache-2.0",
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
        f"- corpus: {', '.join(map(str, run_config.get('data', []))) or 'not recorded'}",
        f"- objectives: {run_config.get('objectives', {})}",
        f"- steps: {run_config.get('max_steps', 'n/a')}",
    ]
    if getattr(cfg, "task", None):
        lines += ["", "## Fine-tuned task", f"- task: {cfg.task}"]
        if getattr(cfg, "id2label", None):
            lines.append(f"- labels: {', '.join(map(str, cfg.id2label.values()))}")
    if summary:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    lines += ["", "## Licence and provenance", "Trained with atlasformer; see atlasformer.json for the run config and checksums.", ""]
    return "\n".join(lines)


def export_model_folder(model, tokenizer: CellTokenizer, output: str | Path, run_config: dict, summary: dict | None = None) -> Path:
    """Write model + tokenizer + manifest + card into ``output`` atomically (temporary folder, then rename)."""
    output = Path(output)
    with atomic_folder(output) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save(tmp)
        (tmp / "README.md").write_text(model_card(model, tokenizer, run_config, summary))
        if summary:
            (tmp / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
        write_manifest(tmp, run_config)
    return output


def load_model_folder(folder: str | Path, verify: bool = True):
    """Load ``(model, tokenizer)`` from a local model folder, checking files and checksums."""
    folder = Path(folder)
    model = load_model(folder, verify=verify)
    try:
        tokenizer = CellTokenizer.load(folder)
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    if len(tokenizer.vocab) != model.config.vocab_size:
        raise CheckpointError(
            f"{folder}: vocab.json has {len(tokenizer.vocab)} tokens but the model was built for "
            f"{model.config.vocab_size}; the vocabulary does not belong to this checkpoint."
        )
    return model, tokenizer
