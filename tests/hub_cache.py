"""Test helper: a local Hugging Face hub cache laid out exactly as huggingface_hub's downloads leave it.

``models--org--name/`` with ``blobs/<etag>`` (git SHA-1 of regular files, SHA-256 of LFS files),
``snapshots/<commit>/<path>`` relative symlinks made by huggingface_hub's own ``_create_symlink``,
``refs/<revision>`` holding the commit hash, and the ``trees/<commit>.json`` listing that offline
``snapshot_download`` checks for completeness. Built with huggingface_hub's helpers, no network.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from huggingface_hub import constants
from huggingface_hub.file_download import (
    _cache_commit_hash_for_specific_revision,
    _create_symlink,
    repo_folder_name,
)

try:  # huggingface_hub >= 1.x checks offline snapshots against a cached tree listing
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
except ImportError:  # older clients have no listing: the snapshot folder alone is the cache
    TreeCacheEntry = write_tree_cache = None

LFS_SUFFIXES = {".safetensors", ".bin", ".pt", ".pkl"}


def add_to_hub_cache(cache_dir: Path, repo_id: str, folder: Path, *, revision: str = "main",
                     prefix: str = "", extra_refs: tuple[str, ...] = ()) -> str:
    """Cache ``folder``'s files as commit ``<hash>`` of ``repo_id`` (under ``prefix/`` in the repo); returns the hash."""
    storage = Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")
    files = {(Path(prefix) / p.relative_to(folder)).as_posix(): p.read_bytes()
             for p in sorted(Path(folder).rglob("*")) if p.is_file()}
    commit = hashlib.sha1(repr(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode()).hexdigest()
    entries = {}
    for rel, data in files.items():
        git_sha = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        lfs = Path(rel).suffix in LFS_SUFFIXES
        etag = hashlib.sha256(data).hexdigest() if lfs else git_sha
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        pointer = storage / "snapshots" / commit / rel
        pointer.parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(pointer), new_blob=False)
        entries[rel] = dict(size=len(data), blob_id=git_sha, lfs_sha256=etag if lfs else None,
                            lfs_size=len(data) if lfs else None)
    for ref in (revision, *extra_refs):
        _cache_commit_hash_for_specific_revision(str(storage), ref, commit)
    if write_tree_cache is not None:
        write_tree_cache(str(storage), commit, {rel: TreeCacheEntry(**entry) for rel, entry in entries.items()})
    return commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache under tmp_path, with HF_HOME / HF_HUB_CACHE pointing at it and HF_HUB_OFFLINE=1."""
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for name, value in {"HF_HOME": home, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("ATLASFORMER_CACHE", raising=False)
    return cache
