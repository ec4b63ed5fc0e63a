"""The safe file layer of model folders: manifest with checksums, atomic writes, and weight readers.

A model folder (docs/formats.md) lists the SHA-256 of every file in ``atlasformer.json``
(:func:`write_manifest`); :func:`read_manifest` checks the format version, that every entry is a regular
file inside the folder, and (``verify``) every checksum. Folders are written into a temporary sibling and
renamed into place (:func:`atomic_folder`), never over files atlasformer did not write. Weights are read
with safetensors (:func:`load_safetensors`) or, for legacy pickles, only through
:func:`load_weights_only`; :func:`load_state_dict_strict` is the one place weights are matched to a module.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import stat
import struct
import tempfile
from contextlib import contextmanager, nullcontext
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

FORMAT_VERSION = 1
"""Model-folder format this code writes and the newest it reads (docs/formats.md: bumped on breaking changes)."""
MANIFEST_FILE = "atlasformer.json"


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


# ------------------------------------------------------------------------------------------ weights
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


def load_state_dict_strict(module: torch.nn.Module, state: dict, *, source: str) -> torch.nn.Module:
    """Load ``state`` into ``module`` with every key and shape matched, and put it in eval mode.

    Any missing or unexpected key (up to five of each named) or a tensor of another shape is a
    :class:`CheckpointError` starting with ``source`` (the folder, or which converter's weights).
    """
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # torch reports shape mismatches this way, whatever ``strict``
        reasons = "; ".join(line.strip() for line in str(err).splitlines()[1:4] if line.strip())
        raise CheckpointError(f"{source}: the weights do not match the architecture ({reasons or err}).") from None
    if missing or unexpected:
        raise CheckpointError(f"{source}: the weights do not match the architecture (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}).")
    return module.eval()


# ------------------------------------------------------------------------------------------ writing
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
