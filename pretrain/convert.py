"""Public checkpoints into atlasformer model folders: scGPT and Geneformer converters, and on-the-fly conversion.

Each converter joins the two halves, the tokenizer (``atlasformer.tokenization.convert``) and the
weights (``atlasformer.model_zoo.convert_scgpt`` / ``convert_geneformer``), and writes an ordinary model
folder with :func:`export_model_folder`: manifest with checksums, model card with provenance.

:func:`resolve_model` is what ``from_pretrained`` and every ``--model`` use: a local folder or hub id in
atlasformer format is returned as is; one in scGPT or Geneformer format (detected by its files) is
converted once and the result cached under ``$ATLASFORMER_CACHE/converted`` (default
``$HF_HOME/atlasformer-converted``), keyed by the SHA-256 of the source files.

Safety: scGPT's ``best_model.pt`` and Geneformer's ``pytorch_model.bin`` load only through
``torch.load(weights_only=True)``, Geneformer's dictionaries through a restricted unpickler, and no code
from a checkpoint or hub repository runs (no ``trust_remote_code``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from atlasformer.model_zoo import CheckpointError, read_manifest
from atlasformer.model_zoo.cell_transformer import CellTransformerConfig
from atlasformer.model_zoo.convert_geneformer import (
    WEIGHT_FILES,
    convert_geneformer_weights,
    load_bert_state_dict,
    read_bert_config,
)
from atlasformer.model_zoo.convert_scgpt import convert_scgpt_weights
from atlasformer.model_zoo.hub import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    load_weights_only,
    resolve_model_location,
    sha256,
)
from atlasformer.tokenization import InputError
from atlasformer.tokenization.convert import (
    GENE_MEDIANS_GLOB,
    TOKEN_DICTIONARY_GLOB,
    find_geneformer_dictionaries,
    geneformer_tokenizer,
    read_json,
    safe_load_pickle,
    scgpt_tokenizer,
)
from atlasformer.tokenization.outputs import refuse_output_over_inputs

from .export import export_model_folder

CONVERTER_VERSION = 1
"""Bumped when a conversion changes; part of the cache key, so old cached conversions are redone."""
SIDECAR_PATTERNS = (TOKEN_DICTIONARY_GLOB, GENE_MEDIANS_GLOB)
"""Files fetched from the whole repository when only a subfolder is requested (Geneformer's dictionaries)."""
LICENSES = {
    "scgpt": ("other", "scGPT's terms (bowang-lab/scGPT, MIT-licensed code); check the source checkpoint's licence"),
    "geneformer": ("apache-2.0", "Apache-2.0, as ctheodoris/Geneformer; check the source checkpoint's licence"),
}


# -------------------------------------------------------------------------------------- detection
def _config_model_type(folder: Path) -> str | None:
    path = folder / "config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}).") from err


def scgpt_weights_file(folder: Path) -> Path | None:
    """scGPT's weights: ``best_model.pt``, else the folder's only ``*.pt`` file."""
    if (folder / "best_model.pt").exists():
        return folder / "best_model.pt"
    candidates = sorted(folder.glob("*.pt"))
    return candidates[0] if len(candidates) == 1 else None


def detect_format(folder: str | os.PathLike) -> str:
    """``"atlasformer"``, ``"scgpt"`` or ``"geneformer"``, from the files in ``folder``."""
    folder = Path(folder)
    model_type = _config_model_type(folder)
    if (folder / MANIFEST_FILE).exists() or model_type == CellTransformerConfig.model_type:
        return "atlasformer"
    if (folder / "args.json").exists() and (folder / "vocab.json").exists() and scgpt_weights_file(folder):
        return "scgpt"
    if model_type == "bert" and any((folder / name).exists() for name in WEIGHT_FILES):
        return "geneformer"
    present = sorted(p.name for p in folder.iterdir())[:15] if folder.is_dir() else []
    raise CheckpointError(
        f"{folder}: not a model folder atlasformer can load (files: {present}). Expected an atlasformer folder "
        "(config.json + model.safetensors + atlasformer.json), scGPT's (best_model.pt + vocab.json + args.json) "
        f"or Geneformer's (a BERT config.json + {' or '.join(WEIGHT_FILES)}); for a repository holding several "
        "models, name one with subfolder= / --subfolder."
    )


# -------------------------------------------------------------------------------------- converters
def _source_files(files: dict[str, Path], root: Path) -> dict[str, str]:
    """``{path relative to the repository: SHA-256}`` of the files a conversion reads."""
    out = {}
    for path in files.values():
        try:
            name = str(path.relative_to(root))
        except ValueError:
            name = str(path)
        out[name] = sha256(path)
    return out


def scgpt_inputs(folder: Path) -> dict[str, Path]:
    weights = scgpt_weights_file(folder)
    if weights is None:
        raise CheckpointError(f"{folder}: no scGPT weights (best_model.pt).")
    for name in ("vocab.json", "args.json"):
        if not (folder / name).exists():
            raise CheckpointError(f"{folder}: scGPT checkpoint lacks {name}.")
    return {"weights": weights, "vocab": folder / "vocab.json", "args": folder / "args.json"}


def geneformer_inputs(folder: Path, root: Path, token_dictionary=None, gene_medians=None) -> dict[str, Path]:
    bert = read_bert_config(folder)
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).exists()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: no weights ({', '.join(WEIGHT_FILES)}).")
    try:
        tokens, medians = find_geneformer_dictionaries(root, int(bert["vocab_size"]), token_dictionary=token_dictionary,
                                                      gene_medians=gene_medians)
    except InputError as err:
        raise CheckpointError(str(err)) from err
    files = {"config": folder / "config.json", "weights": weights, "token_dictionary": tokens, "gene_medians": medians}
    if weights.name.endswith(".index.json"):
        shards = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
        files.update({f"shard{i}": folder / s for i, s in enumerate(shards)})
    return files


def _load_pt(path: Path) -> dict:
    """A legacy ``.pt`` state dict, weights only: tensors and containers (refused otherwise, never run)."""
    return load_weights_only(path, map_location="cpu", fix="re-download the scGPT checkpoint")


def _convert_scgpt_folder(folder: Path, root: Path, output: Path, provenance: dict, overwrite: bool = False) -> Path:
    files = scgpt_inputs(folder)
    refuse_output_over_inputs([output], [root, *files.values()])
    args = read_json(files["args"])
    tokenizer, tok_report = scgpt_tokenizer(read_json(files["vocab"]), args, source=str(files["vocab"]))
    vocab = tokenizer.vocab
    model, weight_report = convert_scgpt_weights(_load_pt(files["weights"]), args, pad_token_id=vocab.pad_id,
                                                 cls_token_id=vocab.cls_id, mask_token_id=vocab.mask_id)
    if model.config.vocab_size != len(vocab):
        raise CheckpointError(f"{folder}: vocab.json has {len(vocab)} tokens but the weights embed "
                              f"{model.config.vocab_size}; they do not belong together.")
    objectives = {"GEP (masked_value, mse)": 1.0, **({"GEPC (mvc)": 1.0} if model.config.mvc_head else {})}
    run_config = _run_config("scgpt", provenance, _source_files(files, root), weight_report, tok_report,
                             objectives, extra={"scgpt_args": args})
    return export_model_folder(model, tokenizer, output, run_config, overwrite=overwrite)


def _convert_geneformer_folder(folder: Path, root: Path, output: Path, provenance: dict, token_dictionary=None,
                               gene_medians=None, overwrite: bool = False) -> Path:
    files = geneformer_inputs(folder, root, token_dictionary, gene_medians)
    refuse_output_over_inputs([output], [root, *files.values()])
    bert = read_bert_config(folder)
    try:
        tokenizer, tok_report = geneformer_tokenizer(
            safe_load_pickle(files["token_dictionary"]), safe_load_pickle(files["gene_medians"]),
            max_seq_len=int(bert["max_position_embeddings"]) - 1, source=str(files["token_dictionary"]))
    except InputError as err:
        raise CheckpointError(str(err)) from err
    vocab = tokenizer.vocab
    n_added = tok_report["n_added_tokens"]
    # V1 dictionaries have no <cls>: the cell embedding is then the mean over genes, as Geneformer's own
    model, weight_report = convert_geneformer_weights(
        load_bert_state_dict(folder), bert, pad_token_id=vocab.pad_id, cls_token_id=vocab.cls_id,
        mask_token_id=vocab.mask_id, n_added_tokens=n_added, pooling="mean" if n_added else "cls")
    run_config = _run_config("geneformer", provenance, _source_files(files, root), weight_report, tok_report,
                             {"masked_gene (MLM)": 1.0} if model.config.gene_head else {})
    return export_model_folder(model, tokenizer, output, run_config, overwrite=overwrite)


def _run_config(fmt: str, provenance: dict, files: dict, weight_report: dict, tok_report: dict, objectives: dict,
                extra: dict | None = None) -> dict:
    license_id, note = LICENSES[fmt]
    return {
        "converted_from": {"format": fmt, **provenance, "files": files, "weights": weight_report, "tokenizer": tok_report,
                           "converter_version": CONVERTER_VERSION},
        "data": [f"the {fmt} pretraining corpus (see the source checkpoint)"],
        "objectives": objectives,
        "license": license_id,
        "license_note": note,
        **(extra or {}),
    }


def convert_scgpt(source: str | os.PathLike, output: str | os.PathLike, *, revision: str | None = None,
                  subfolder: str | None = None, overwrite: bool = False) -> Path:
    """Convert an scGPT checkpoint (``best_model.pt``, ``vocab.json``, ``args.json``) into a model folder.

    Parameters
    ----------
    source
        The scGPT folder, or a hub id holding one.
    output
        The atlasformer model folder to write (replaced atomically). It may not hold the source, and an
        existing folder with files atlasformer did not write is refused unless ``overwrite``.
    revision, subfolder
        Hub revision, and the folder inside the repository or ``source`` that holds the model.
    """
    root, folder = resolve_model_location(source, revision, subfolder)
    provenance = {"source": str(source), "revision": revision, "subfolder": subfolder}
    return _convert_scgpt_folder(folder, root, Path(output), provenance, overwrite)


def convert_geneformer(source: str | os.PathLike, output: str | os.PathLike, *, token_dictionary=None,
                       gene_medians=None, revision: str | None = None, subfolder: str | None = None,
                       overwrite: bool = False) -> Path:
    """Convert a Geneformer checkpoint (a BertForMaskedLM folder + its dictionaries) into a model folder.

    The token dictionary and gene-median pickles are found under the repository (or ``source``) by
    matching the model's vocabulary size, unless given; they are read with a restricted unpickler.
    """
    root, folder = resolve_model_location(source, revision, subfolder, SIDECAR_PATTERNS if subfolder else ())
    provenance = {"source": str(source), "revision": revision, "subfolder": subfolder}
    return _convert_geneformer_folder(folder, root, Path(output), provenance, token_dictionary, gene_medians,
                                      overwrite)


# ---------------------------------------------------------------------------------- on the fly
def converted_cache_dir() -> Path:
    """Where on-the-fly conversions are kept: ``$ATLASFORMER_CACHE/converted`` or ``$HF_HOME/atlasformer-converted``."""
    if os.environ.get("ATLASFORMER_CACHE"):
        return Path(os.environ["ATLASFORMER_CACHE"]) / "converted"
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "atlasformer-converted"


def _cache_key(fmt: str, files: dict[str, str]) -> str:
    digest = hashlib.sha256(f"{fmt}:{CONVERTER_VERSION}:{FORMAT_VERSION}".encode())
    for name, file_hash in sorted(files.items()):
        digest.update(f"{name}={file_hash}\n".encode())
    return f"{fmt}-{digest.hexdigest()[:24]}"


def resolve_model(model: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None) -> Path:
    """A local atlasformer model folder for ``model`` (folder or hub id), converting scGPT / Geneformer ones.

    Conversions are cached by the SHA-256 of their source files, so a second call only re-hashes.
    """
    root, folder = resolve_model_location(model, revision, subfolder, SIDECAR_PATTERNS if subfolder else ())
    fmt = detect_format(folder)
    if fmt == "atlasformer":
        return folder
    inputs = scgpt_inputs(folder) if fmt == "scgpt" else geneformer_inputs(folder, root)
    target = converted_cache_dir() / _cache_key(fmt, _source_files(inputs, root))
    if (target / MANIFEST_FILE).exists():
        try:
            read_manifest(target, verify=True)
            return target
        except CheckpointError:
            pass  # a damaged cache entry: convert again
    print(f"converting {fmt} checkpoint {model} into {target} (once; later loads use the cache)", file=sys.stderr)
    provenance = {"source": str(model), "revision": revision, "subfolder": subfolder}
    converters = {"scgpt": _convert_scgpt_folder, "geneformer": _convert_geneformer_folder}
    return converters[fmt](folder, root, target, provenance)
