"""Model folders on disk: manifest with checksums, model card, atomic writes, and loading by class name.

A model folder (see docs/formats.md) holds the model's ``config.json`` + ``model.safetensors`` beside
the tokenizer's files, plus ``atlasformer.json`` (format version, atlasformer version, run config and
the SHA-256 of every file) and a ``README.md`` model card. The manifest and card are written by the
code that exports a folder; this module only knows files and torch modules, never AnnData.

Hub ids (``org/name``) resolve through huggingface_hub's cache, revisions and ``HF_HUB_OFFLINE``
(:func:`resolve_model_path`); :func:`push_model_folder` validates a folder and uploads it (docs/hub.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from safetensors.torch import load_file

from .cell_transformer import CellTransformerConfig, CellTransformerForPretraining
from .task_heads import (
    CellTransformerForAnnotation,
    CellTransformerForImputation,
    CellTransformerForIntegration,
    CellTransformerForModality,
)

FORMAT_VERSION = 1
"""Model-folder format this code writes and the newest it reads (docs/formats.md: bumped on breaking changes)."""
MANIFEST_FILE = "atlasformer.json"
MODEL_FILES = ("config.json", "model.safetensors")
FOLDER_FILES = (*MODEL_FILES, "vocab.json", "tokenizer_config.json", "README.md", MANIFEST_FILE)
"""Files every complete model folder holds (``gene_medians.json`` too for rank-value tokenizers)."""
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")

# config.json "architectures" entry -> class; a plain lookup, no registry
MODEL_CLASSES = {
    "CellTransformerForPretraining": CellTransformerForPretraining,
    "CellTransformerForAnnotation": CellTransformerForAnnotation,
    "CellTransformerForIntegration": CellTransformerForIntegration,
    "CellTransformerForImputation": CellTransformerForImputation,
    "CellTransformerForModality": CellTransformerForModality,
}


class CheckpointError(ValueError):
    """A model folder that cannot be loaded as it is; the message says why and what to do."""


def atlasformer_version() -> str:
    try:
        return version("atlasformer")
    except PackageNotFoundError:
        return "0+unknown"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike, run_config: dict | None = None, extra: dict | None = None) -> dict:
    """Write ``atlasformer.json`` listing the SHA-256 of every other file in ``folder``."""
    folder = Path(folder)
    files = {name: sha256(folder / name) for name in folder_files(folder)}
    manifest = {
        "format_version": FORMAT_VERSION,
        "atlasformer_version": atlasformer_version(),
        "run_config": run_config or {},
        "files": files,
        **(extra or {}),
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def folder_files(folder: Path) -> list[str]:
    """Relative paths of the files a manifest covers: all but the manifest and hidden (tool cache) entries."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def read_manifest(folder: str | os.PathLike, verify: bool = True) -> dict:
    """Read and check ``atlasformer.json``: format version and (``verify``) every file's SHA-256."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.exists():
        return {}
    manifest = json.loads(path.read_text())
    fmt = int(manifest.get("format_version", 0))
    if fmt > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder}: written in model-folder format {fmt} by atlasformer {manifest.get('atlasformer_version')}; "
            f"this atlasformer reads format <= {FORMAT_VERSION}. Upgrade: pip install -U atlasformer."
        )
    if verify:
        for name, expected in manifest.get("files", {}).items():
            file = folder / name
            if not file.exists():
                raise CheckpointError(f"{folder}: {name} listed in the manifest is missing; re-download the model.")
            if sha256(file) != expected:
                raise CheckpointError(f"{folder}: {name} does not match its SHA-256 in the manifest; the file is corrupt or was altered.")
    return manifest


def check_model_files(folder: str | os.PathLike, required: tuple[str, ...] = MODEL_FILES) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; pass a model folder or a hub id.")
    missing = [name for name in required if not (folder / name).exists()]
    if missing:
        raise CheckpointError(
            f"{folder}: model folder is missing {missing}. A model folder holds config.json, model.safetensors, "
            "vocab.json and tokenizer_config.json; re-export or re-download it."
        )
    return folder


def load_model(folder: str | os.PathLike, verify: bool = True):
    """Load the model saved in ``folder`` with the class named in its config (safetensors only)."""
    folder = check_model_files(folder)
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != CellTransformerConfig.model_type:
        raise CheckpointError(
            f"{folder}: config.json is a {model_type!r} model, not an atlasformer one. scGPT and Geneformer folders "
            "load through atlasformer.from_pretrained / --model (converted on the fly) or `atlasformer convert`."
        )
    read_manifest(folder, verify=verify)
    config = CellTransformerConfig.from_pretrained(folder)
    arch = (config.architectures or ["CellTransformerForPretraining"])[0]
    if arch not in MODEL_CLASSES:
        raise CheckpointError(f"{folder}: unknown architecture {arch!r}; known: {sorted(MODEL_CLASSES)}.")
    model = MODEL_CLASSES[arch](config)
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]}).")
    model.eval()
    return model


@contextmanager
def atomic_folder(target: str | os.PathLike):
    """Yield a temporary sibling folder, then move it to ``target`` in one rename (replacing it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------ hub ids
def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub read it at import, or as set since."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


SHIPPED_MODELS = ("atlasformer-public-small",)
"""Models inside the installed package (``model_zoo/pretrained/<name>/``), loadable by name with no network."""


def shipped_model_folder(name: str) -> Path:
    """The folder of a model shipped with the package; a clear error when the installation lacks its files."""
    folder = Path(__file__).resolve().parent / "pretrained" / name
    if not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"{name} should ship with atlasformer but {folder} holds no model.safetensors: "
                              "reinstall the package (pip install --force-reinstall atlasformer).")
    return folder


def resolve_model_location(model: str | os.PathLike, revision: str | None = None, subfolder: str | None = None,
                           extra_patterns: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """``(root, folder)``: the local folder or hub snapshot holding ``model``, and the model folder in it.

    Hub ids go through huggingface_hub's cache, revisions (branch, tag or commit) and ``HF_HUB_OFFLINE``
    (then only the cache is read). With ``subfolder`` only that folder, plus files matching
    ``extra_patterns`` anywhere in the repository, is downloaded.
    """
    if subfolder and (Path(subfolder).is_absolute() or ".." in Path(subfolder).parts):
        raise CheckpointError(f"subfolder={subfolder!r} must be a relative path inside the model repository.")
    if str(model) in SHIPPED_MODELS:  # offline, before any path or hub id (FORMATS.md)
        if revision or subfolder:
            raise CheckpointError(f"{model} ships with the package: it has no revision or subfolder.")
        folder = shipped_model_folder(str(model))
        return folder, folder
    path = Path(model).expanduser()
    if path.exists():
        if revision:
            raise CheckpointError(f"{model}: revision={revision!r} applies to hub ids, but this is a local folder.")
        return path, _subfolder(path, subfolder, str(model))
    text = str(model)
    if not HUB_ID.match(text):
        raise CheckpointError(f"{model}: no such model folder, and not a hub id of the form 'org/name'.")
    root = _snapshot(text, revision, subfolder, extra_patterns)
    return root, _subfolder(root, subfolder, text)


def resolve_model_path(model: str | os.PathLike, revision: str | None = None, subfolder: str | None = None,
                       extra_patterns: tuple[str, ...] = ()) -> Path:
    """A local folder for ``model``: a path as is, or a hub id resolved through huggingface_hub.

    When offline (``HF_HUB_OFFLINE=1``) and not cached, the error names the id and how to fetch it.
    The folder may still be in scGPT or Geneformer format: ``atlasformer.pretrain.convert.resolve_model``
    converts those.
    """
    return resolve_model_location(model, revision, subfolder, extra_patterns)[1]


def _subfolder(root: Path, subfolder: str | None, name: str) -> Path:
    if not subfolder:
        return root
    target = root / subfolder
    if not target.is_dir():
        # folders that look like models (config.json, or scGPT's args.json) are the useful suggestions
        found = sorted({str(p.parent.relative_to(root)) for pattern in ("config.json", "args.json")
                        for p in root.rglob(pattern) if not any(s.startswith(".") for s in p.relative_to(root).parts)})
        raise CheckpointError(f"{name}: has no subfolder {subfolder!r}; model folders in it: {found[:20]}.")
    return target


def _snapshot(repo_id: str, revision: str | None, subfolder: str | None, extra_patterns: tuple[str, ...]) -> Path:
    """Download (or, offline, find in the cache) the snapshot of ``repo_id`` at ``revision``."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = hub_offline()
    patterns = [f"{subfolder.strip('/')}/*", *extra_patterns] if subfolder else None
    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline))
    except LocalEntryNotFoundError as err:
        fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
        reason = "HF_HUB_OFFLINE=1 forbids downloads" if offline else "the hub could not be reached"
        incomplete = type(err).__name__ == "IncompleteSnapshotError"  # a cached copy with files missing
        raise CheckpointError(
            f"{repo_id}{at}: {'only partly' if incomplete else 'not'} in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and {reason}. "
            f"Fetch it once with network access (`{fetch}`, or huggingface_hub.snapshot_download({repo_id!r})) "
            "and run again, or pass a local model folder."
        ) from err
    except RevisionNotFoundError as err:
        raise CheckpointError(f"{repo_id}: revision {revision!r} does not exist (a branch, tag or commit hash).") from err
    except RepositoryNotFoundError as err:
        raise CheckpointError(
            f"{repo_id}: no such model repository on the hub (or it is private or gated: log in with `hf auth login`), "
            "and no local folder of that name."
        ) from err
    except (HfHubHTTPError, OSError, ValueError) as err:  # network and repository errors from the hub client
        raise CheckpointError(f"{repo_id}{at}: could not be fetched from the hub ({type(err).__name__}: {err}).") from err


# -------------------------------------------------------------------------------------------- push
def validate_model_folder(folder: str | os.PathLike) -> dict:
    """Check that ``folder`` is a complete, intact model folder; returns its manifest.

    Complete: the files of :data:`FOLDER_FILES` (and ``gene_medians.json`` for rank-value tokenizers),
    every file listed in the manifest with a matching SHA-256 and no unlisted file, a non-empty model
    card, a vocabulary the size the model was built for, and weights that load into the config's class.
    """
    folder = check_model_files(folder, FOLDER_FILES)
    manifest = read_manifest(folder, verify=True)
    unlisted = sorted(set(folder_files(folder)) - set(manifest.get("files", {})))
    if unlisted:
        raise CheckpointError(f"{folder}: {unlisted[:5]} are not in atlasformer.json; re-export the folder instead of "
                              "adding files by hand (their checksums would be unknown).")
    if not (folder / "README.md").read_text().strip():
        raise CheckpointError(f"{folder}: README.md (the model card) is empty.")
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    if tokenizer.get("kind") == "rank" and not (folder / "gene_medians.json").exists():
        raise CheckpointError(f"{folder}: a rank-value tokenizer needs gene_medians.json beside tokenizer_config.json.")
    n_tokens = len(json.loads((folder / "vocab.json").read_text()))
    model = load_model(folder, verify=False)
    if n_tokens != model.config.vocab_size:
        raise CheckpointError(f"{folder}: vocab.json has {n_tokens} tokens, the model {model.config.vocab_size}.")
    return manifest


def push_model_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False, dry_run: bool = False,
                      commit_message: str | None = None, revision: str | None = None) -> dict:
    """Upload a validated model folder to the hub repository ``repo_id`` (created if needed).

    Returns the plan (``repo_id``, ``folder``, ``files``, ``private``) and, unless ``dry_run``, the
    commit ``url``. Only the manifest's files and the manifest itself are uploaded.
    """
    if not HUB_ID.match(repo_id):
        raise CheckpointError(f"{repo_id!r} is not a hub id of the form 'org/name'.")
    folder = Path(folder)
    manifest = validate_model_folder(folder)
    files = sorted([*manifest["files"], MANIFEST_FILE])
    plan = {"repo_id": repo_id, "folder": str(folder), "files": files, "private": private, "url": None}
    if dry_run:
        return plan
    if hub_offline():
        raise CheckpointError("HF_HUB_OFFLINE=1 is set: pushing needs the network (or use --dry-run).")
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model", allow_patterns=files, revision=revision,
        commit_message=commit_message or f"Upload atlasformer model (format {manifest.get('format_version')})",
    )
    plan["url"] = str(getattr(commit, "commit_url", commit))
    return plan
