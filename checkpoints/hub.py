"""Where model folders come from and go to: shipped names, local paths, hub ids (pull), and ``hub push``.

:func:`resolve_model_location` turns what ``--model`` / ``from_pretrained`` are given into a local folder:
the name of a model shipped with the package (``pretrained/<name>/``, offline), a local path, or a hub id
(``org/name``) fetched through huggingface_hub's cache, revisions and ``HF_HUB_OFFLINE``
(:func:`snapshot`). The folder may still be in scGPT or Geneformer format: :func:`.resolve.resolve_model`
converts those. :func:`push_model_folder` validates a folder and uploads it (docs/hub.md).
"""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

from .files import MANIFEST_FILE, CheckpointError, hub_blob_store, manifest_entry_path
from .folder import validate_model_folder

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


# ------------------------------------------------------------------------------------ locations
def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub read it at import, or as set since."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


SHIPPED_MODELS = ("atlasformer-public-small",)
"""Models inside the installed package (``checkpoints/pretrained/<name>/``), loadable by name with no network."""


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
    root = snapshot(text, revision, subfolder, extra_patterns)
    return root, _subfolder(root, subfolder, text)


def resolve_model_path(model: str | os.PathLike, revision: str | None = None, subfolder: str | None = None,
                       extra_patterns: tuple[str, ...] = ()) -> Path:
    """A local folder for ``model``: a path as is, or a hub id resolved through huggingface_hub.

    When offline (``HF_HUB_OFFLINE=1``) and not cached, the error names the id and how to fetch it.
    The folder may still be in scGPT or Geneformer format: ``atlasformer.checkpoints.resolve_model``
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


# ----------------------------------------------------------------------------------------- pull
def snapshot(repo_id: str, revision: str | None, subfolder: str | None, extra_patterns: tuple[str, ...]) -> Path:
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

# ----------------------------------------------------------------------------------------- push
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
