"""Torch modules and their Hugging Face configs: the cell transformer, task heads, model-folder I/O.

Imports neither ``atlasformer.tokenization`` nor anndata.
"""

from .cell_transformer import (
    CellModelOutput,
    CellTransformer,
    CellTransformerConfig,
    CellTransformerForPretraining,
    count_parameters,
)
from .hub import CheckpointError, atomic_folder, load_model, read_manifest, write_manifest
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
    "CheckpointError",
    "SCVIConfig",
    "SCVIModule",
    "TOTALVIConfig",
    "TOTALVIModule",
    "atomic_folder",
    "count_parameters",
    "load_model",
    "read_manifest",
    "write_manifest",
]
