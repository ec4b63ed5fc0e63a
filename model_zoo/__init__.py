"""Torch modules and their Hugging Face configs: the cell transformer, task heads, VAE baselines.

Imports neither ``atlasformer.tokenization`` nor anndata. The weight half of the scGPT and Geneformer
converters (``convert_scgpt``, ``convert_geneformer``: source state dict + config -> our config and state
dict) lives here; model folders (writing, reading, orchestrating conversions, the hub) live in
``atlasformer.checkpoints``. Importing this package registers the config and backbone
with transformers' Auto classes.
"""

from .cell_transformer import (
    CellModelOutput,
    CellTransformer,
    CellTransformerConfig,
    CellTransformerForPretraining,
    count_parameters,
)
from .task_heads import (
    CellTransformerForAnnotation,
    CellTransformerForImputation,
    CellTransformerForIntegration,
    CellTransformerForModality,
)
from .vae import SCVIConfig, SCVIModule, TOTALVIConfig, TOTALVIModule

__all__ = [
    "CellModelOutput",
    "CellTransformer",
    "CellTransformerConfig",
    "CellTransformerForAnnotation",
    "CellTransformerForImputation",
    "CellTransformerForIntegration",
    "CellTransformerForModality",
    "CellTransformerForPretraining",
    "SCVIConfig",
    "SCVIModule",
    "TOTALVIConfig",
    "TOTALVIModule",
    "count_parameters",
]


def register_auto_classes() -> None:
    """Let transformers' ``AutoConfig`` / ``AutoModel`` load atlasformer folders (the backbone) with no
    ``trust_remote_code``: the classes are registered in this process; nothing is downloaded or executed."""
    from transformers import AutoConfig, AutoModel

    try:
        AutoConfig.register(CellTransformerConfig.model_type, CellTransformerConfig)
        AutoModel.register(CellTransformerConfig, CellTransformer)
    except ValueError:  # already registered (e.g. the module was reloaded)
        pass


register_auto_classes()
