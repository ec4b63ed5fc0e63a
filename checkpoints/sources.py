"""Reading other tools' plain checkpoint files, and recording where a conversion came from.

scGPT's ``vocab.json`` / ``args.json`` are read with :func:`read_json` (token maps are checked by the
tokenizer half, :mod:`atlasformer.tokenization.convert`, which also unpickles Geneformer's dictionaries
with its restricted unpickler). Every conversion records the SHA-256 of the files it read and the
converter's version in the folder's run config (:func:`converted_run_config`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from atlasformer.tokenization import InputError

from .files import CheckpointError, sha256

CONVERTER_VERSION = 1
"""Bumped when a conversion changes; part of the cache key, so old cached conversions are redone."""
LICENSES = {
    "scgpt": ("other", "scGPT's terms (bowang-lab/scGPT, MIT-licensed code); check the source checkpoint's licence"),
    "geneformer": ("apache-2.0", "Apache-2.0, as ctheodoris/Geneformer; check the source checkpoint's licence"),
}


# ------------------------------------------------------------------------------------- plain files
def read_json(path: str | os.PathLike) -> dict:
    """A JSON file as a dict, with an error naming the file when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot be read as JSON ({err}).") from err


def config_model_type(folder: Path) -> str | None:
    """``model_type`` of the folder's ``config.json`` (None without one): tells atlasformer's from BERT's."""
    path = folder / "config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}).") from err


# ------------------------------------------------------------------------------------- provenance
def source_files(files: dict[str, Path], root: Path) -> dict[str, str]:
    """``{path relative to the repository: SHA-256}`` of the files a conversion reads."""
    out = {}
    for path in files.values():
        try:
            name = str(path.relative_to(root))
        except ValueError:
            name = str(path)
        out[name] = sha256(path)
    return out


def converted_run_config(fmt: str, provenance: dict, files: dict, weight_report: dict, tok_report: dict,
                         objectives: dict, extra: dict | None = None) -> dict:
    """The run config of a converted folder: ``converted_from`` (source, its files' SHA-256, what the weight and
    tokenizer halves reported, the converter's version), the corpus, objectives and licence for its card."""
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
