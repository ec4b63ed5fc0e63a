"""Public API functions that compose the stages: loading model folders and zero-shot embedding."""

from __future__ import annotations

import os

import anndata as ad
import numpy as np

from atlasformer.checkpoints import load_model_folder, resolve_model
from atlasformer.finetune.common import iter_model_outputs, record_provenance, to_inference_device


def from_pretrained(model: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None,
                    verify: bool = True):
    """Load ``(model, tokenizer)`` from a model folder or a hub id ("org/name").

    Parameters
    ----------
    model
        Local folder or Hugging Face hub id (resolved through huggingface_hub's cache; honours
        ``HF_HUB_OFFLINE``). Folders and repositories in scGPT or Geneformer format are converted on
        first use and the result cached (see ``atlasformer.checkpoints.resolve_model``).
    revision
        Hub branch, tag or commit.
    subfolder
        Folder inside the repository holding the model.
    verify
        Check every file against the SHA-256 in ``atlasformer.json``.
    """
    return load_model_folder(resolve_model(model, revision=revision, subfolder=subfolder), verify=verify)


def cell_embeddings(adata: ad.AnnData, model, *, layer: str | None = None, gene_key: str | None = None,
                    chunk_size: int = 2048, batch_size: int = 64, cpu: bool = False) -> np.ndarray:
    """(cells, d_model) zero-shot embeddings; ``model`` is a folder, hub id or ``(model, tokenizer)`` pair.

    Cells without any vocabulary gene get zeros. Reads counts chunk by chunk, so backed AnnData works. The model
    runs on the GPU when there is one (a model passed in is moved there, as a transformers pipeline does), or on
    the CPU with ``cpu=True``.
    """
    net, tokenizer = from_pretrained(model) if isinstance(model, (str, os.PathLike)) else model
    to_inference_device(net, cpu)
    out = np.zeros((adata.n_obs, net.config.d_model), dtype=np.float32)
    for rows, emb in iter_model_outputs(net, adata, tokenizer, layer=layer, gene_key=gene_key,
                                        chunk_size=chunk_size, batch_size=batch_size):
        out[rows] = emb
    return out


def embed(adata: ad.AnnData, model, *, layer: str | None = None, gene_key: str | None = None,
          key_added: str = "X_atlasformer", chunk_size: int = 2048, batch_size: int = 64, copy: bool = False,
          cpu: bool = False):
    """Zero-shot cell embeddings from any checkpoint into ``obsm[key_added]`` (see :func:`cell_embeddings`; on the
    GPU when there is one, unless ``cpu``).

    Returns an annotated copy with ``copy=True``, else writes into ``adata`` and returns None. Which model and
    layer produced the embedding is recorded in ``uns['atlasformer']['obsm'][key_added]``.
    """
    pair = from_pretrained(model) if isinstance(model, (str, os.PathLike)) else model
    emb = cell_embeddings(adata, pair, layer=layer, gene_key=gene_key, chunk_size=chunk_size, batch_size=batch_size,
                          cpu=cpu)
    target = adata.copy() if copy else adata
    target.obsm[key_added] = emb
    record_provenance(target, {("obsm", key_added)}, model=model if isinstance(model, (str, os.PathLike)) else
                      "in-memory model", layer=layer, settings={"gene_key": gene_key}, weights=pair[0])
    return target if copy else None
