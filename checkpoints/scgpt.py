"""The scGPT converter: ``best_model.pt`` + ``vocab.json`` + ``args.json`` -> an atlasformer model folder.

Orchestration only: locate the files, read them safely (``best_model.pt`` only through
``torch.load(weights_only=True)``, :func:`.files.load_weights_only`), call the two halves, load the mapped
weights strictly (:func:`.files.load_state_dict_strict`) and write the folder with its manifest.

- Tokenizer half, :func:`atlasformer.tokenization.convert.scgpt_tokenizer`: ``vocab.json`` -> GeneVocab and
  a binned tokenizer as scGPT's.
- Weight half, :func:`atlasformer.model_zoo.convert_scgpt.convert_scgpt_weights`: scGPT's state dict and
  ``args.json`` -> CellTransformerConfig and state dict (the parameter mapping is documented there).
"""

from __future__ import annotations

import os
from pathlib import Path

from atlasformer.model_zoo import CellTransformerForPretraining
from atlasformer.model_zoo.cell_transformer import ConversionError
from atlasformer.model_zoo.convert_scgpt import convert_scgpt_weights
from atlasformer.tokenization.convert import scgpt_tokenizer
from atlasformer.tokenization.outputs import refuse_output_over_inputs

from .files import CheckpointError, load_state_dict_strict, load_weights_only
from .folder import export_model_folder
from .hub import resolve_model_location
from .sources import converted_run_config, read_json, source_files


def scgpt_weights_file(folder: Path) -> Path | None:
    """scGPT's weights: ``best_model.pt``, else the folder's only ``*.pt`` file."""
    if (folder / "best_model.pt").exists():
        return folder / "best_model.pt"
    candidates = sorted(folder.glob("*.pt"))
    return candidates[0] if len(candidates) == 1 else None


def scgpt_inputs(folder: Path) -> dict[str, Path]:
    """The files a conversion reads: weights, ``vocab.json`` and ``args.json`` (a :class:`CheckpointError` if one lacks)."""
    weights = scgpt_weights_file(folder)
    if weights is None:
        raise CheckpointError(f"{folder}: no scGPT weights (best_model.pt).")
    for name in ("vocab.json", "args.json"):
        if not (folder / name).exists():
            raise CheckpointError(f"{folder}: scGPT checkpoint lacks {name}.")
    return {"weights": weights, "vocab": folder / "vocab.json", "args": folder / "args.json"}


def load_scgpt_state(path: Path) -> dict:
    """A legacy ``.pt`` state dict, weights only: tensors and containers (refused otherwise, never run)."""
    return load_weights_only(path, map_location="cpu", fix="re-download the scGPT checkpoint")


def convert_scgpt_folder(folder: Path, root: Path, output: Path, provenance: dict, overwrite: bool = False) -> Path:
    """Convert the scGPT checkpoint in the local ``folder`` (inside ``root``, the repository) into ``output``."""
    files = scgpt_inputs(folder)
    refuse_output_over_inputs([output], [root, *files.values()])
    args = read_json(files["args"])
    tokenizer, tok_report = scgpt_tokenizer(read_json(files["vocab"]), args, source=str(files["vocab"]))
    vocab = tokenizer.vocab
    try:
        config, state, weight_report = convert_scgpt_weights(load_scgpt_state(files["weights"]), args,
                                                             pad_token_id=vocab.pad_id, cls_token_id=vocab.cls_id,
                                                             mask_token_id=vocab.mask_id)
    except ConversionError as err:
        raise CheckpointError(str(err)) from err
    model = load_state_dict_strict(CellTransformerForPretraining(config), state, source="scGPT weights")
    if model.config.vocab_size != len(vocab):
        raise CheckpointError(f"{folder}: vocab.json has {len(vocab)} tokens but the weights embed "
                              f"{model.config.vocab_size}; they do not belong together.")
    objectives = {"GEP (masked_value, mse)": 1.0, **({"GEPC (mvc)": 1.0} if model.config.mvc_head else {})}
    run_config = converted_run_config("scgpt", provenance, source_files(files, root), weight_report, tok_report,
                                      objectives, extra={"scgpt_args": args})
    return export_model_folder(model, tokenizer, output, run_config, overwrite=overwrite)


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
    return convert_scgpt_folder(folder, root, Path(output), provenance, overwrite)
