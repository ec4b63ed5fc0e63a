"""Resolve what ``--model`` / ``from_pretrained`` are given into a local atlasformer model folder.

A shipped model's name, a local folder or a hub id (:func:`.hub.resolve_model_location`) in atlasformer
format is returned as is; one in scGPT or Geneformer format (detected by its files) is converted once
and the result cached under ``$ATLASFORMER_CACHE/converted`` (default ``$HF_HOME/atlasformer-converted``),
keyed by the SHA-256 of the source files. No code from a checkpoint or hub repository runs (no
``trust_remote_code``).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from atlasformer.model_zoo import CellTransformerConfig

from . import geneformer, scgpt
from .files import FORMAT_VERSION, MANIFEST_FILE, CheckpointError, read_manifest
from .hub import resolve_model_location
from .sources import CONVERTER_VERSION, config_model_type, source_files


def detect_format(folder: str | os.PathLike) -> str:
    """``"atlasformer"``, ``"scgpt"`` or ``"geneformer"``, from the files in ``folder``."""
    folder = Path(folder)
    model_type = config_model_type(folder)
    if (folder / MANIFEST_FILE).exists() or model_type == CellTransformerConfig.model_type:
        return "atlasformer"
    if (folder / "args.json").exists() and (folder / "vocab.json").exists() and scgpt.scgpt_weights_file(folder):
        return "scgpt"
    if model_type == "bert" and any((folder / name).exists() for name in geneformer.WEIGHT_FILES):
        return "geneformer"
    present = sorted(p.name for p in folder.iterdir())[:15] if folder.is_dir() else []
    raise CheckpointError(
        f"{folder}: not a model folder atlasformer can load (files: {present}). Expected an atlasformer folder "
        "(config.json + model.safetensors + atlasformer.json), scGPT's (best_model.pt + vocab.json + args.json) "
        f"or Geneformer's (a BERT config.json + {' or '.join(geneformer.WEIGHT_FILES)}); for a repository holding "
        "several models, name one with subfolder= / --subfolder."
    )


# ----------------------------------------------------------------------------------- on the fly
def converted_cache_dir() -> Path:
    """Where on-the-fly conversions are kept: ``$ATLASFORMER_CACHE/converted`` or ``$HF_HOME/atlasformer-converted``."""
    if os.environ.get("ATLASFORMER_CACHE"):
        return Path(os.environ["ATLASFORMER_CACHE"]) / "converted"
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "atlasformer-converted"


def _cache_key(fmt: str, files: dict[str, str]) -> str:
    """The cache entry of a conversion: format, converter and folder-format versions, and the source files' SHA-256."""
    digest = hashlib.sha256(f"{fmt}:{CONVERTER_VERSION}:{FORMAT_VERSION}".encode())
    for name, file_hash in sorted(files.items()):
        digest.update(f"{name}={file_hash}\n".encode())
    return f"{fmt}-{digest.hexdigest()[:24]}"


def resolve_model(model: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None) -> Path:
    """A local atlasformer model folder for ``model`` (folder or hub id), converting scGPT / Geneformer ones.

    Conversions are cached by the SHA-256 of their source files, so a second call only re-hashes.
    """
    sidecars = geneformer.SIDECAR_PATTERNS if subfolder else ()
    root, folder = resolve_model_location(model, revision, subfolder, sidecars)
    fmt = detect_format(folder)
    if fmt == "atlasformer":
        return folder
    inputs = scgpt.scgpt_inputs(folder) if fmt == "scgpt" else geneformer.geneformer_inputs(folder, root)
    target = converted_cache_dir() / _cache_key(fmt, source_files(inputs, root))
    if (target / MANIFEST_FILE).exists():
        try:
            read_manifest(target, verify=True)
            return target
        except CheckpointError:
            pass  # a damaged cache entry: convert again
    print(f"converting {fmt} checkpoint {model} into {target} (once; later loads use the cache)", file=sys.stderr)
    provenance = {"source": str(model), "revision": revision, "subfolder": subfolder}
    converters = {"scgpt": scgpt.convert_scgpt_folder, "geneformer": geneformer.convert_geneformer_folder}
    return converters[fmt](folder, root, target, provenance)
