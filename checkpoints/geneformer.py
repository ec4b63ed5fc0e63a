"""The Geneformer converter: a transformers BertForMaskedLM folder + its dictionaries -> an atlasformer model folder.

Orchestration only: locate the files (the BERT folder, and the token dictionary and gene-median pickles
anywhere in the repository), read them safely (safetensors, or ``pytorch_model.bin`` only through
``torch.load(weights_only=True)``; the pickles through the restricted unpickler), call the two halves,
load the mapped weights strictly (:func:`.files.load_state_dict_strict`) and write the folder with its
manifest. No code from the folder is ever run.

- Tokenizer half, :mod:`atlasformer.tokenization.convert`: the dictionaries are found and read
  (:func:`~atlasformer.tokenization.convert.find_geneformer_dictionaries`,
  :func:`~atlasformer.tokenization.convert.safe_load_pickle`) and become a rank-value tokenizer
  (:func:`~atlasformer.tokenization.convert.geneformer_tokenizer`).
- Weight half, :mod:`atlasformer.model_zoo.convert_geneformer`: BERT's state dict and ``config.json`` ->
  CellTransformerConfig and state dict (the parameter mapping is documented there).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from atlasformer.model_zoo import CellTransformerForPretraining
from atlasformer.model_zoo.cell_transformer import ConversionError
from atlasformer.model_zoo.convert_geneformer import check_bert_config, convert_geneformer_weights
from atlasformer.tokenization import InputError
from atlasformer.tokenization.convert import (
    GENE_MEDIANS_GLOB,
    TOKEN_DICTIONARY_GLOB,
    find_geneformer_dictionaries,
    geneformer_tokenizer,
    safe_load_pickle,
)
from atlasformer.tokenization.outputs import refuse_output_over_inputs

from .files import CheckpointError, load_safetensors, load_state_dict_strict, load_weights_only
from .folder import export_model_folder
from .hub import resolve_model_location
from .sources import converted_run_config, source_files

SIDECAR_PATTERNS = (TOKEN_DICTIONARY_GLOB, GENE_MEDIANS_GLOB)
"""Files fetched from the whole repository when only a subfolder is requested (Geneformer's dictionaries)."""
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def read_bert_config(folder: str | os.PathLike) -> dict:
    """``config.json`` of a BERT folder as a dict, checked to be a model the converter reproduces."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder}: config.json missing; a Geneformer folder is a transformers BertForMaskedLM folder.")
    try:
        return check_bert_config(json.loads(path.read_text()), source=str(path))
    except ConversionError as err:
        raise CheckpointError(str(err)) from err


def load_bert_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a transformers folder: safetensors (single or sharded) or ``pytorch_model.bin`` (weights only)."""
    folder = Path(folder)
    fix = "re-download the Geneformer checkpoint"
    if (folder / "model.safetensors").exists():
        return load_safetensors(folder / "model.safetensors", fix=fix)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_safetensors(folder / shard, fix=fix))
        return state
    if (folder / "pytorch_model.bin").exists():
        # legacy pickle: anything but tensors and plain containers is refused, never run
        return load_weights_only(folder / "pytorch_model.bin", map_location="cpu", fix=fix)
    raise CheckpointError(f"{folder}: no weights ({', '.join(WEIGHT_FILES)}).")


def geneformer_inputs(folder: Path, root: Path, token_dictionary=None, gene_medians=None) -> dict[str, Path]:
    """The files a conversion reads: config, weights (and shards), token dictionary and gene medians."""
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


def convert_geneformer_folder(folder: Path, root: Path, output: Path, provenance: dict, token_dictionary=None,
                              gene_medians=None, overwrite: bool = False) -> Path:
    """Convert the Geneformer checkpoint in the local ``folder`` (its dictionaries under ``root``) into ``output``."""
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
    try:
        config, state, weight_report = convert_geneformer_weights(
            load_bert_state_dict(folder), bert, pad_token_id=vocab.pad_id, cls_token_id=vocab.cls_id,
            mask_token_id=vocab.mask_id, n_added_tokens=n_added, pooling="mean" if n_added else "cls")
    except ConversionError as err:
        raise CheckpointError(str(err)) from err
    model = load_state_dict_strict(CellTransformerForPretraining(config), state, source="BERT weights")
    run_config = converted_run_config("geneformer", provenance, source_files(files, root), weight_report, tok_report,
                                      {"masked_gene (MLM)": 1.0} if model.config.gene_head else {})
    return export_model_folder(model, tokenizer, output, run_config, overwrite=overwrite)


def convert_geneformer(source: str | os.PathLike, output: str | os.PathLike, *, token_dictionary=None,
                       gene_medians=None, revision: str | None = None, subfolder: str | None = None,
                       overwrite: bool = False) -> Path:
    """Convert a Geneformer checkpoint (a BertForMaskedLM folder + its dictionaries) into a model folder.

    The token dictionary and gene-median pickles are found under the repository (or ``source``) by
    matching the model's vocabulary size, unless given; they are read with a restricted unpickler.
    """
    root, folder = resolve_model_location(source, revision, subfolder, SIDECAR_PATTERNS if subfolder else ())
    provenance = {"source": str(source), "revision": revision, "subfolder": subfolder}
    return convert_geneformer_folder(folder, root, Path(output), provenance, token_dictionary, gene_medians,
                                     overwrite)
