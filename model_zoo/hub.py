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
import pickle
import re
import shutil
import socket
import stat
import struct
import sys
import tempfile
import warnings
from contextlib import contextmanager, nullcontext
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .cell_transformer import CellTransformer, CellTransformerConfig, CellTransformerForPretraining
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
    """Read and check ``atlasformer.json``: format version, entries and (``verify``) every file's SHA-256.

    Parameters
    ----------
    folder
        The model folder.
    verify
        Check that every listed file exists and matches its SHA-256. Without it a folder lacking the
        manifest reads as ``{}`` (nothing can be checked; :func:`load_model` warns).

    Raises
    ------
    CheckpointError
        The manifest is missing (with ``verify``: every folder atlasformer writes has one, so its
        absence means the files cannot be trusted), is not valid JSON, is of a newer format, or lists
        an entry that is not a regular file inside the folder; or (``verify``) a file is missing or altered.
    """
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.exists():
        if not verify:
            return {}
        raise CheckpointError(
            f"{folder}: has no {MANIFEST_FILE} (every model folder atlasformer writes lists its files' SHA-256 there), "
            "so its files cannot be verified; re-export or re-download the model (from_pretrained / load_model with "
            "verify=False load it unchecked)."
        )
    manifest = _parse_manifest(path)
    fmt = manifest["format_version"]
    if fmt > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder}: written in model-folder format {fmt} by atlasformer {manifest.get('atlasformer_version')}; "
            f"this atlasformer reads format <= {FORMAT_VERSION}. Upgrade: pip install -U atlasformer."
        )
    blob_store = hub_blob_store(folder)
    for name, expected in manifest["files"].items():
        file = manifest_entry_path(folder, name, blob_store)
        if not verify:
            continue
        if not file.exists():
            raise CheckpointError(f"{folder}: {name} listed in the manifest is missing; re-download the model.")
        if sha256(file) != expected:
            raise CheckpointError(f"{folder}: {name} does not match its SHA-256 in the manifest; the file is corrupt or was altered.")
    return manifest


def _parse_manifest(path: Path) -> dict:
    """The manifest's JSON, with ``format_version`` an int and ``files`` a mapping, or a :class:`CheckpointError`."""
    fix = "re-export or re-download the model"
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); {fix}.") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise CheckpointError(f"{path} is not an atlasformer manifest (no 'files' mapping); {fix}.")
    try:
        manifest["format_version"] = int(manifest.get("format_version", 0))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: format_version {manifest.get('format_version')!r} is not an integer; {fix}.") from err
    manifest.setdefault("files", {})
    return manifest


def hub_blob_store(folder: Path) -> Path | None:
    """The ``blobs/`` folder of the huggingface_hub cache repository holding ``folder``, if it is a snapshot.

    huggingface_hub leaves every file of a downloaded snapshot (``models--org--name/snapshots/<commit>/``)
    as a symlink into the repository's ``blobs/``: the one place outside a folder its files may live.
    """
    parts = folder.absolute().parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] == "snapshots" and re.match(r"^(models|datasets|spaces)--", parts[i - 1]):
            blobs = Path(*parts[:i]) / "blobs"
            return blobs.resolve() if blobs.is_dir() else None
    return None


def manifest_entry_path(folder: Path, name, blob_store: Path | None = None) -> Path:
    """The file a manifest entry names, refused unless it is a regular file inside ``folder``.

    Refused: absolute paths, ``..`` components, symlinks (of the file or a folder on its way) leaving
    ``folder`` (except into ``blob_store``, see :func:`hub_blob_store`), and devices, fifos, sockets or
    folders, whose hashing could hang or read anything. A missing file is returned as is.
    """

    def refuse(problem: str) -> CheckpointError:
        return CheckpointError(f"{folder}: the manifest entry {name!r} in {MANIFEST_FILE} {problem}; a manifest lists "
                               "only regular files inside the model folder: re-export or re-download the model.")

    if not isinstance(name, str) or not name.strip():
        raise refuse("is not a file name")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise refuse("is an absolute path")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise refuse("points outside the folder (..)")
    path = folder / name
    if not path.exists() and not path.is_symlink():
        return path
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise refuse(f"cannot be resolved ({err})") from err
    if not (_inside(target, folder.resolve()) or (blob_store is not None and _inside(target, blob_store))):
        raise refuse(f"is a symlink to {target}, outside the folder")
    if not target.exists():
        return path  # a dangling symlink: reported as missing
    if not stat.S_ISREG(target.stat().st_mode):
        raise refuse("is not a regular file (a device, fifo, socket or folder)")
    return path


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


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
    """Load the model saved in ``folder`` with the class named in its config (safetensors only).

    A folder without ``atlasformer.json`` is refused (its files cannot be verified; every folder
    atlasformer writes, converted ones included, has one); with ``verify=False`` it loads with a warning.
    """
    folder = check_model_files(folder)
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != CellTransformerConfig.model_type:
        raise CheckpointError(
            f"{folder}: config.json is a {model_type!r} model, not an atlasformer one. scGPT and Geneformer folders "
            "load through atlasformer.from_pretrained / --model (converted on the fly) or `atlasformer convert`."
        )
    if not read_manifest(folder, verify=verify):
        warnings.warn(f"{folder}: no {MANIFEST_FILE}; loading unverified (format version and file checksums not "
                      "checked) because verify=False.", stacklevel=2)
    config = CellTransformerConfig.from_pretrained(folder)
    arch = (config.architectures or ["CellTransformerForPretraining"])[0]
    if arch not in MODEL_CLASSES:
        raise CheckpointError(f"{folder}: unknown architecture {arch!r}; known: {sorted(MODEL_CLASSES)}.")
    model = MODEL_CLASSES[arch](config)
    state = load_safetensors(folder / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]}).")
    model.eval()
    return model


def load_safetensors(path: Path, device: str = "cpu", *, fix: str = "re-export or re-download the model") -> dict:
    """The tensors of a safetensors file; a truncated or corrupt one is a :class:`CheckpointError` naming it and ``fix``."""
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({err}); the file is truncated or corrupt: "
                              f"{fix}.") from err


_BLOCKED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_weights_only(path: str | os.PathLike, map_location=None, *, safe_globals: tuple = (),
                      fix: str = "re-download or re-create it"):
    """``torch.load(path, weights_only=True)`` with atlasformer's errors: the one place pickles are read.

    A pickle holding anything but tensors and plain containers is refused, since unpickling it could run
    code; the message says how to convert it safely. A truncated or corrupt file names the file and
    ``fix``. Both raise :class:`CheckpointError`; torch's own advice (to turn the check off) never reaches the user.

    Parameters
    ----------
    path
        The pickle (``.pt`` / ``.bin``) file.
    map_location
        As for ``torch.load``.
    safe_globals
        Plain data classes allowed besides tensors (DeepSpeed's ZeRO files).
    fix
        What to do about an unreadable file, for its error message.
    """
    allowed = torch.serialization.safe_globals(list(safe_globals)) if safe_globals else nullcontext()
    try:
        with allowed:
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = _BLOCKED_GLOBAL.search(str(err))
        if blocked is None:
            raise CheckpointError(f"{path}: unreadable as a weights-only state dict (not a torch pickle, or "
                                  f"truncated or corrupt); {fix}.") from None
        raise CheckpointError(
            f"{path}: refused or unreadable as a weights-only state dict: it holds {blocked.group(1)}, not just tensors "
            "and plain containers, and unpickling that could run code. To use it, convert it where you trust its "
            "source: load it there and save its tensors with safetensors.torch.save_file (or torch.save a plain dict "
            "of tensors)."
        ) from None
    except (RuntimeError, EOFError, struct.error, ValueError, OSError) as err:
        reason = str(err).splitlines()[0].split(". ")[0] if str(err) else type(err).__name__  # torch's first sentence
        raise CheckpointError(f"{path}: unreadable as a weights-only state dict ({reason}); the file is "
                              f"truncated or corrupt: {fix}.") from err


def foreign_files(folder: Path) -> list[str]:
    """Files in an existing ``folder`` that its manifest does not list (all of them when it has none)."""
    if not folder.is_dir():
        return []
    present = [str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()]
    try:
        listed = set(json.loads((folder / MANIFEST_FILE).read_text()).get("files", {}))
    except (OSError, ValueError, AttributeError):
        listed = set()
    listed.add(MANIFEST_FILE)
    return sorted(name for name in present if name not in listed)


def refuse_foreign_model_folder(target: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Raise :class:`CheckpointError` when replacing ``target`` would delete files atlasformer did not write."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target}: is a file; a model folder path is needed.")
    foreign = [] if overwrite else foreign_files(target)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise CheckpointError(f"{target}: holds files atlasformer did not write ({shown}), which replacing the "
                              "model folder would delete; choose a new output folder, or pass --overwrite "
                              "(overwrite=True) to replace it.")


@contextmanager
def atomic_folder(target: str | os.PathLike, *, overwrite: bool = False):
    """Yield a temporary sibling folder, then move it to ``target`` in one rename (replacing it).

    An existing ``target`` is replaced only when everything in it was written by atlasformer (listed in its
    manifest), or with ``overwrite``: files a user put there are never deleted silently.
    """
    target = Path(target)
    refuse_foreign_model_folder(target, overwrite=overwrite)
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
    """Download (or, offline, find in the cache) the snapshot of ``repo_id`` at ``revision``.

    ``repo_id`` is no existing path here, yet ``mymodels/run1`` reads as a hub id too: when the hub cannot
    supply it, the error names both readings, a missing folder and an unreachable or uncached hub id.
    """
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
    fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline))
    except LocalEntryNotFoundError as err:
        if type(err).__name__ == "IncompleteSnapshotError":  # a cached copy with files missing: surely a hub id
            raise CheckpointError(
                f"{repo_id}{at}: only partly in the local Hugging Face cache ({constants.HF_HUB_CACHE}). "
                f"Fetch it again with network access (`{fetch}`) and run again, or pass a local model folder."
            ) from err
        if not offline:
            raise CheckpointError(unreachable_hub_id_message(repo_id, at, err)) from err
        raise CheckpointError(
            f"no such folder {repo_id}; as a hub id{at} it is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids downloads. Check the folder path, or fetch "
            f"the model once with network access (`{fetch}`, or huggingface_hub.snapshot_download({repo_id!r})) "
            "and run again."
        ) from err
    except RevisionNotFoundError as err:
        raise CheckpointError(f"{repo_id}: revision {revision!r} does not exist (a branch, tag or commit hash).") from err
    except RepositoryNotFoundError as err:
        raise CheckpointError(
            f"{repo_id}: no such model repository on the hub (or it is private or gated: log in with `hf auth login`), "
            "and no local folder of that name."
        ) from err
    except network_errors() as err:
        raise CheckpointError(unreachable_hub_id_message(repo_id, at, err)) from err
    except (HfHubHTTPError, OSError, ValueError) as err:  # repository errors from the hub client
        raise CheckpointError(f"{repo_id}{at}: could not be fetched from the hub ({type(err).__name__}: {err}).") from err


def network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the hub could not be reached, whichever HTTP client huggingface_hub uses.

    huggingface_hub lets its client's transport errors through (httpx2, httpx or requests, by version),
    and those of httpx are no ``OSError``; only clients already imported are looked up.
    """
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    for module_name, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                               ("requests.exceptions", ("ConnectionError", "Timeout"))):
        module = sys.modules.get(module_name)
        errors += [getattr(module, name) for name in names if hasattr(module, name)]
    return tuple(errors)


def short_reason(err: BaseException) -> str:
    """``Type: first line`` of what stopped a hub request: the cause, when huggingface_hub wrapped it."""
    cause = err.__cause__ or err
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0][:160]}" if lines else type(cause).__name__


def hub_endpoint() -> str:
    """The hub huggingface_hub talks to: ``HF_ENDPOINT`` as read at its import (https://huggingface.co by default)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def unreachable_hub_id_message(repo_id: str, at: str, err: BaseException) -> str:
    """The error for a string that is no folder and, as a hub id, was neither reachable nor cached."""
    return (f"no such folder {repo_id}; as a hub id{at} it could not be reached ({hub_endpoint()}: {short_reason(err)}) "
            "and is not in the local Hugging Face cache. Check the folder path, or for a hub id the network or "
            "HF_ENDPOINT.")


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


def upload_files(folder: Path, manifest: dict) -> list[str]:
    """The files ``hub push`` uploads: the manifest and its entries, each a regular file inside ``folder``.

    Checked here again, right before the upload plan, so that no entry can upload a file from outside
    the folder (a symlink's target, a device); names with glob characters are refused too, since the
    upload takes them as patterns that could match unlisted files.
    """
    blob_store = hub_blob_store(folder)
    for name in manifest["files"]:
        manifest_entry_path(folder, name, blob_store)
        if any(char in name for char in "*?[]"):
            raise CheckpointError(f"{folder}: the manifest entry {name!r} holds a glob character, which the upload would "
                                  "read as a pattern; rename the file and re-export the folder.")
    return sorted([*manifest["files"], MANIFEST_FILE])


def push_model_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False, dry_run: bool = False,
                      commit_message: str | None = None, revision: str | None = None) -> dict:
    """Upload a validated model folder to the hub repository ``repo_id`` (created if needed).

    Returns the plan (``repo_id``, ``folder``, ``files``, ``private``) and, unless ``dry_run``, the
    commit ``url``. Only the manifest's files and the manifest itself are uploaded, and only when each is
    a regular file inside the folder (:func:`upload_files`), dry run or not.
    """
    if not HUB_ID.match(repo_id):
        raise CheckpointError(f"{repo_id!r} is not a hub id of the form 'org/name'.")
    folder = Path(folder)
    manifest = validate_model_folder(folder)
    files = upload_files(folder, manifest)
    plan = {"repo_id": repo_id, "folder": str(folder), "files": files, "private": private, "url": None}
    if dry_run:
        return plan
    if hub_offline():
        raise CheckpointError("HF_HUB_OFFLINE=1 is set: pushing needs the network (or use --dry-run).")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type="model", allow_patterns=files, revision=revision,
            commit_message=commit_message or f"Upload atlasformer model (format {manifest.get('format_version')})",
        )
    except HfHubHTTPError as err:  # the hub answered, and said no
        raise CheckpointError(hub_refusal_message(api.endpoint, repo_id, err)) from err
    except network_errors() as err:
        raise CheckpointError(
            f"could not reach the Hugging Face hub at {api.endpoint} ({short_reason(err)}); check the network or "
            "HF_ENDPOINT, or use --dry-run to validate without uploading."
        ) from err
    plan["url"] = str(getattr(commit, "commit_url", commit))
    return plan


def hub_refusal_message(endpoint: str, repo_id: str, err: BaseException) -> str:
    """The error for an upload the hub refused; log-in advice when it did not accept the credentials."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    fix = ("log in with `hf auth login` (or set HF_TOKEN) as an account that may write to it" if status in (401, 403)
           else "check the repository id and try again")
    return f"the Hugging Face hub at {endpoint} refused the upload to {repo_id} ({short_reason(err)}); {fix}."
