"""Model folders, in one place: write (atomic, manifest with checksums, card), read and verify, resolve a
shipped name, folder or hub id, convert scGPT and Geneformer checkpoints, and push to the hub.

A conversion is orchestrated here (detect the format, locate and read the source files safely, write the
folder); its tokenizer half lives in ``atlasformer.tokenization.convert`` and its weight half in
``atlasformer.model_zoo.convert_scgpt`` / ``convert_geneformer``.

Transformer folders (pretraining, fine-tuning, conversions) and VAE baseline folders go through the same
writer (:func:`write_model_folder`) and reader (:func:`load_model`); docs/formats.md describes the layout.
Imports ``atlasformer.tokenization`` and ``atlasformer.model_zoo``; ``pretrain``, ``finetune`` and the root
import it.
"""

from .card import model_card, public_name
from .files import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    CheckpointError,
    atomic_folder,
    load_safetensors,
    load_state_dict_strict,
    load_weights_only,
    read_manifest,
    refuse_foreign_model_folder,
    sha256,
    write_manifest,
)
from .folder import (
    export_model_folder,
    load_model,
    load_model_folder,
    load_vae_folder,
    save_vae_folder,
    validate_model_folder,
    write_model_folder,
)
from .geneformer import convert_geneformer
from .hub import (
    SHIPPED_MODELS,
    push_model_folder,
    resolve_model_location,
    resolve_model_path,
    shipped_model_folder,
)
from .resolve import detect_format, resolve_model
from .scgpt import convert_scgpt

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "SHIPPED_MODELS",
    "CheckpointError",
    "atomic_folder",
    "convert_geneformer",
    "convert_scgpt",
    "detect_format",
    "export_model_folder",
    "load_model",
    "load_model_folder",
    "load_safetensors",
    "load_state_dict_strict",
    "load_vae_folder",
    "load_weights_only",
    "model_card",
    "public_name",
    "push_model_folder",
    "read_manifest",
    "refuse_foreign_model_folder",
    "resolve_model",
    "resolve_model_location",
    "resolve_model_path",
    "save_vae_folder",
    "sha256",
    "shipped_model_folder",
    "validate_model_folder",
    "write_manifest",
    "write_model_folder",
]
