"""atlasformer: pretrain single-cell foundation models on AnnData and fine-tune them.

The root package holds only the CLI, the YAML loader and this public API; the stages live in
``atlasformer.tokenization``, ``atlasformer.model_zoo``, ``atlasformer.checkpoints`` (model folders),
``atlasformer.pretrain``, ``atlasformer.finetune`` (also mapping and cell search) and ``atlasformer.analysis``
(genes, attention, perturbation, clusters, trajectories). Names are resolved lazily, so importing a stage
(e.g. model_zoo, which never imports anndata) does not import the others. ``atlasformer.settings.verbosity``
sets how much they tell you.
"""

from __future__ import annotations

from importlib import import_module

from . import settings  # noqa: F401  (the console handler of the "atlasformer" logger, for every stage)

__version__ = "0.1.0"

_EXPORTS = {
    "GeneVocab": "atlasformer.tokenization",
    "CellTokenizer": "atlasformer.tokenization",
    "TokenizerConfig": "atlasformer.tokenization",
    "simulate_counts": "atlasformer.tokenization",
    "CellTransformerConfig": "atlasformer.model_zoo",
    "CellTransformer": "atlasformer.model_zoo",
    "PretrainConfig": "atlasformer.pretrain",
    "FinetuneConfig": "atlasformer.finetune",
    "Annotator": "atlasformer.finetune",
    "annotate": "atlasformer.finetune",
    "SCANVIModel": "atlasformer.finetune",
    "map_query": "atlasformer.finetune",
    "transfer_labels": "atlasformer.finetune",
    "build_index": "atlasformer.finetune",
    "search_index": "atlasformer.finetune",
    "gene_embeddings": "atlasformer.analysis",
    "gene_programs": "atlasformer.analysis",
    "perturb_genes": "atlasformer.analysis",
    "attention_network": "atlasformer.analysis",
    "cluster": "atlasformer.analysis",
    "trajectory": "atlasformer.analysis",
    "from_pretrained": "atlasformer.api",
    "embed": "atlasformer.api",
    "cell_embeddings": "atlasformer.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'atlasformer' has no attribute {name!r}")
