"""Model folders: one writer and one reader, for transformer and VAE folders alike (docs/formats.md).

- :func:`write_model_folder` fills a temporary folder, writes the manifest (the SHA-256 of every file)
  and renames it into place. :func:`export_model_folder` writes a transformer folder with it (the model
  saved by model_zoo's ``save_pretrained``, the tokenizer beside it by tokenization, a card, metrics);
  :func:`save_vae_folder` a VAE baseline's (``config.json`` naming the module's architecture, holding its
  config and the wrapper's AnnData keys, ``model.safetensors`` and a card).
- :func:`load_model` reads either kind back, manifest checked, weights matched key for key, by the class
  named in ``config.json``; :func:`load_model_folder` adds the tokenizer, :func:`load_vae_folder` the
  wrapper's keys. :func:`validate_model_folder` is the stricter check before a hub push.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers.utils import logging as hf_logging

from atlasformer.model_zoo import (
    CellTransformerConfig,
    CellTransformerForAnnotation,
    CellTransformerForImputation,
    CellTransformerForIntegration,
    CellTransformerForModality,
    CellTransformerForPretraining,
    SCVIConfig,
    SCVIModule,
    TOTALVIConfig,
    TOTALVIModule,
)
from atlasformer.model_zoo.cell_transformer import CellTransformerPreTrainedModel
from atlasformer.model_zoo.from_tokenizer import tokenizer_mismatches
from atlasformer.model_zoo.vae import SCANVIConfig, SCANVIModule
from atlasformer.tokenization import CellTokenizer

from .card import model_card, vae_card
from .files import (
    MANIFEST_FILE,
    CheckpointError,
    atomic_folder,
    folder_files,
    load_safetensors,
    load_state_dict_strict,
    read_manifest,
    write_manifest,
)

MODEL_FILES = ("config.json", "model.safetensors")
FOLDER_FILES = (*MODEL_FILES, "vocab.json", "tokenizer_config.json", "README.md", MANIFEST_FILE)
"""Files every complete transformer folder holds (``gene_medians.json`` too for rank-value tokenizers)."""
VAE_FOLDER_FILES = (*MODEL_FILES, "README.md", MANIFEST_FILE)
"""Files every complete VAE folder holds."""

# config.json "architectures" entry (transformers) or "architecture" (VAE) -> class; a plain lookup, no registry
MODEL_CLASSES = {
    "CellTransformerForPretraining": CellTransformerForPretraining,
    "CellTransformerForAnnotation": CellTransformerForAnnotation,
    "CellTransformerForIntegration": CellTransformerForIntegration,
    "CellTransformerForImputation": CellTransformerForImputation,
    "CellTransformerForModality": CellTransformerForModality,
}
VAE_CLASSES = {"SCVIModule": (SCVIConfig, SCVIModule), "TOTALVIModule": (TOTALVIConfig, TOTALVIModule),
               "SCANVIModule": (SCANVIConfig, SCANVIModule)}


# -------------------------------------------------------------------------------------------- writing
def write_model_folder(output: str | os.PathLike, write: Callable[[Path], None], run_config: dict, *,
                       overwrite: bool = False) -> Path:
    """The one writer: ``write(tmp)`` fills a temporary sibling of ``output``, the manifest lists every file
    it wrote (with ``run_config``), and one rename puts the folder in place.

    An existing ``output`` holding files atlasformer did not write is refused unless ``overwrite``.
    """
    output = Path(output)
    with atomic_folder(output, overwrite=overwrite) as tmp:
        write(tmp)
        write_manifest(tmp, run_config)
    return output


def export_model_folder(model, tokenizer: CellTokenizer, output: str | Path, run_config: dict, summary: dict | None = None,
                        benchmark: list[dict] | None = None, *, overwrite: bool = False) -> Path:
    """Write model + tokenizer + manifest + card into ``output`` atomically (temporary folder, then rename).

    ``benchmark`` rows (the ``results.json`` of ``atlasformer benchmark``) become a table in the card. An
    existing ``output`` holding files atlasformer did not write is refused unless ``overwrite``.
    """

    def write(tmp: Path) -> None:
        hf_logging.disable_progress_bar()  # one shard: a progress bar per export is noise
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save(tmp)
        (tmp / "README.md").write_text(model_card(model, tokenizer, run_config, summary, benchmark))
        if summary:
            (tmp / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))

    return write_model_folder(output, write, run_config, overwrite=overwrite)


def save_vae_folder(module: torch.nn.Module, output: str | Path, keys: dict, run_config: dict | None = None,
                    summary: dict | None = None, *, overwrite: bool = False) -> Path:
    """Write a VAE baseline's folder atomically: ``config.json`` (``architecture``, the module's config under
    ``module``, and the wrapper's AnnData ``keys``), ``model.safetensors``, a card and the manifest."""
    arch = type(module).__name__
    if arch not in VAE_CLASSES:
        raise CheckpointError(f"{arch} is not a VAE module atlasformer can save; known: {sorted(VAE_CLASSES)}.")
    run_config = run_config or {}

    def write(tmp: Path) -> None:
        config = {"architecture": arch, "module": module.config.to_dict(), **keys}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "README.md").write_text(vae_card(module, keys, run_config, summary))

    return write_model_folder(output, write, run_config, overwrite=overwrite)


def finish_save_pretrained(model, folder: str | os.PathLike) -> None:
    """What ``model.save_pretrained(folder)`` adds to transformers' files: the tokenizer the model was loaded with
    (``model.tokenizer``, set by :func:`load_model_folder`) and the manifest, so that
    ``atlasformer.from_pretrained(folder)`` reads the folder back."""
    tokenizer = model.__dict__.get("tokenizer")  # a plain attribute, not a submodule
    if tokenizer is not None:
        tokenizer.save(folder)
    write_manifest(folder, {"saved_with": "save_pretrained"})


# model_zoo writes no model-folder files itself: its save_pretrained calls this hook once the weights are saved
CellTransformerPreTrainedModel.after_save_pretrained = finish_save_pretrained


# -------------------------------------------------------------------------------------------- reading
def check_model_files(folder: str | os.PathLike, required: tuple[str, ...] = MODEL_FILES) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; pass a model folder or a hub id.")
    missing = [name for name in required if not (folder / name).exists()]
    if missing:
        raise CheckpointError(
            f"{folder}: model folder is missing {missing}. A model folder holds config.json, model.safetensors, "
            "vocab.json and tokenizer_config.json (a VAE folder: config.json and model.safetensors); re-export or "
            "re-download it."
        )
    return folder


def read_config(folder: Path) -> dict:
    """``config.json`` of a model folder as a dict (a :class:`CheckpointError` when it is not a JSON object)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); re-export or re-download the model.") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a model config (a JSON object); re-export or re-download the model.")
    return config


def folder_architecture(folder: Path, config: dict) -> tuple[str, str]:
    """``(kind, class name)`` of an atlasformer folder's model: ``("transformer", ...)`` or ``("vae", ...)``."""
    if config.get("model_type") == CellTransformerConfig.model_type:
        return "transformer", (config.get("architectures") or ["CellTransformerForPretraining"])[0]
    if config.get("architecture") in VAE_CLASSES:
        return "vae", config["architecture"]
    raise CheckpointError(
        f"{folder}: config.json is a {config.get('model_type') or config.get('architecture')!r} model, not an "
        "atlasformer one. scGPT and Geneformer folders load through atlasformer.from_pretrained / --model "
        "(converted on the fly) or `atlasformer convert`."
    )


def load_model(folder: str | os.PathLike, verify: bool = True, *, architectures=None) -> torch.nn.Module:
    """The one reader: the model saved in ``folder`` (a transformer or a VAE module), with the class named in
    its config, weights from safetensors matched key for key, in eval mode.

    Every file is checked against the manifest. A folder without ``atlasformer.json`` is refused (its files
    cannot be verified; every folder atlasformer writes, converted ones included, has one); with
    ``verify=False`` it loads with a warning. ``architectures`` (class names) refuses any other model.
    """
    folder = check_model_files(folder)
    config = read_config(folder)
    kind, arch = folder_architecture(folder, config)
    if architectures is not None and arch not in architectures:
        raise CheckpointError(f"{folder}: holds {arch!r}, not one of {sorted(architectures)}; "
                              "load it with the matching class.")
    if not read_manifest(folder, verify=verify):
        warnings.warn(f"{folder}: no {MANIFEST_FILE}; loading unverified (format version and file checksums not "
                      "checked) because verify=False.", stacklevel=2)
    if kind == "transformer":
        if arch not in MODEL_CLASSES:
            raise CheckpointError(f"{folder}: unknown architecture {arch!r}; known: {sorted(MODEL_CLASSES)}.")
        model = MODEL_CLASSES[arch](CellTransformerConfig.from_pretrained(folder))
    else:
        config_cls, module_cls = VAE_CLASSES[arch]
        fields = {f.name for f in dataclasses.fields(config_cls)}
        model = module_cls(config_cls(**{k: v for k, v in config.get("module", {}).items() if k in fields}))
    return load_state_dict_strict(model, load_safetensors(folder / "model.safetensors"), source=str(folder))


def load_model_folder(folder: str | Path, verify: bool = True):
    """Load ``(model, tokenizer)`` from a local transformer folder, checking files and checksums."""
    folder = check_model_files(folder)
    kind, arch = folder_architecture(folder, read_config(folder))
    if kind == "vae":
        raise CheckpointError(f"{folder}: holds a VAE baseline ({arch}), which has no tokenizer; load it with "
                              "atlasformer.finetune.SCVIModel.load / TOTALVIModel.load / SCANVIModel.load.")
    tokenizer_files = [n for n in ("vocab.json", "tokenizer_config.json") if not (folder / n).exists()]
    if tokenizer_files:
        raise CheckpointError(
            f"{folder}: holds a model but not its tokenizer ({', '.join(tokenizer_files)} missing). Save the tokenizer "
            "beside it (tokenizer.save_pretrained(folder)), or save a model loaded with atlasformer.from_pretrained, "
            "which carries its tokenizer.")
    model = load_model(folder, verify=verify)
    try:
        tokenizer = CellTokenizer.load(folder)
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    problems = tokenizer_mismatches(model.config, tokenizer)  # vocabulary, special ids, values, bins, positions
    if problems:
        raise CheckpointError(f"{folder}: the tokenizer does not belong to this checkpoint: {'; '.join(problems)}.")
    model.tokenizer = tokenizer  # model.save_pretrained(folder) writes it beside the weights
    return model, tokenizer


def load_vae_folder(folder: str | Path, architectures=None, verify: bool = True) -> tuple[torch.nn.Module, dict]:
    """``(module, config)`` of a VAE folder written by :func:`save_vae_folder`: the module through
    :func:`load_model` (manifest checked), and ``config.json`` with the wrapper's AnnData keys."""
    module = load_model(folder, verify=verify, architectures=architectures)
    return module, read_config(Path(folder))


def validate_model_folder(folder: str | os.PathLike) -> dict:
    """Check that ``folder`` is a complete, intact model folder; returns its manifest.

    Complete: the files of :data:`FOLDER_FILES` (:data:`VAE_FOLDER_FILES` for a VAE; ``gene_medians.json``
    for rank-value tokenizers), every file listed in the manifest with a matching SHA-256 and no unlisted
    file, a non-empty model card, a vocabulary the size the model was built for, and weights that load into
    the config's class.
    """
    folder = check_model_files(folder)
    kind, _ = folder_architecture(folder, read_config(folder))
    folder = check_model_files(folder, FOLDER_FILES if kind == "transformer" else VAE_FOLDER_FILES)
    manifest = read_manifest(folder, verify=True)
    unlisted = sorted(set(folder_files(folder)) - set(manifest.get("files", {})))
    if unlisted:
        raise CheckpointError(f"{folder}: {unlisted[:5]} are not in atlasformer.json; re-export the folder instead of "
                              "adding files by hand (their checksums would be unknown).")
    if not (folder / "README.md").read_text().strip():
        raise CheckpointError(f"{folder}: README.md (the model card) is empty.")
    if kind == "vae":
        load_model(folder, verify=False)
        return manifest
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    if tokenizer.get("kind") == "rank" and not (folder / "gene_medians.json").exists():
        raise CheckpointError(f"{folder}: a rank-value tokenizer needs gene_medians.json beside tokenizer_config.json.")
    load_model_folder(folder, verify=False)  # weights and tokenizer load, and the vocabulary fits the model
    return manifest
