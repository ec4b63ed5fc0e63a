"""Weight half of the scGPT converter: scGPT's state dict and ``args.json`` -> a CellTransformerConfig and state dict.

scGPT's ``TransformerModel`` (bowang-lab/scGPT, ``scgpt/model/model.py``) maps onto the CellTransformer
as follows (post-norm, ReLU, gene embedding with its own LayerNorm, continuous value encoder, ``<cls>``
pooling):

==============================================  ==============================================
scGPT                                           atlasformer
==============================================  ==============================================
encoder.embedding / encoder.enc_norm            backbone.embeddings.genes / .gene_norm
value_encoder.linear1 / linear2 / norm          backbone.embeddings.values.linear1 / linear2 / norm
transformer_encoder.layers.i.self_attn          backbone.encoder.layers.i.attention
  .in_proj_weight / .Wqkv.weight (flash)          .in_proj.weight (same q, k, v row layout)
  .out_proj                                       .out_proj
transformer_encoder.layers.i.linear1/2, norm1/2 backbone.encoder.layers.i.linear1/2, norm1/2
decoder.fc.0 / 2 / 4 (ExprDecoder)              value_head.net.0 / 2 / 4 (value_head="mse")
mvc_decoder.gene2query                          mvc_head.gene_query
mvc_decoder.W (no bias)                         mvc_head.cell_key, transposed, zero bias
==============================================  ==============================================

scGPT's MVC value is ``<W q, c>`` with ``q`` the gene query and ``c`` the cell embedding; ours is
``<q, K c + b>``, equal with ``K = W^T`` and ``b = 0``. Weights the CellTransformer has no place for
are dropped and listed in the report (the one-class pretraining classifier, zero-probability heads,
the adversarial batch discriminator); weights that change the forward pass (batch labels, DSBN,
perturbation flags, non-inner-product MVC) are refused (:class:`ConversionError`), so a converted model never
silently differs. Pure torch: no files are read here; ``atlasformer.checkpoints.scgpt`` reads ``best_model.pt``
(weights only), loads the mapped state strictly and writes the model folder.
"""

from __future__ import annotations

import re

import torch

from .cell_transformer import CellTransformerConfig, ConversionError

# scGPT prefix -> atlasformer prefix (parameters copied as they are)
PREFIX_MAP = {
    "encoder.embedding.": "backbone.embeddings.genes.",
    "encoder.enc_norm.": "backbone.embeddings.gene_norm.",
    "value_encoder.linear1.": "backbone.embeddings.values.linear1.",
    "value_encoder.linear2.": "backbone.embeddings.values.linear2.",
    "value_encoder.norm.": "backbone.embeddings.values.norm.",
    "decoder.fc.": "value_head.net.",
    "mvc_decoder.gene2query.": "mvc_head.gene_query.",
}
# per encoder layer: scGPT suffix -> atlasformer suffix
LAYER_MAP = {
    "self_attn.in_proj_weight": "attention.in_proj.weight",
    "self_attn.in_proj_bias": "attention.in_proj.bias",
    "self_attn.Wqkv.weight": "attention.in_proj.weight",
    "self_attn.Wqkv.bias": "attention.in_proj.bias",
    "self_attn.out_proj.weight": "attention.out_proj.weight",
    "self_attn.out_proj.bias": "attention.out_proj.bias",
    "linear1.weight": "linear1.weight",
    "linear1.bias": "linear1.bias",
    "linear2.weight": "linear2.weight",
    "linear2.bias": "linear2.bias",
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
}
# weights with no counterpart that do not change embeddings or expression predictions
DROPPED_PREFIXES = {
    "cls_decoder.": "cell-type classifier of the pretraining run (fine-tune a new head instead)",
    "decoder.zero_logit.": "explicit zero-probability head of the expression decoder",
    "mvc_decoder.W_zero_logit.": "explicit zero-probability head of the MVC decoder",
    "grad_reverse_discriminator.": "adversarial batch discriminator (DAB)",
}
# weights that change the forward pass in ways the CellTransformer does not reproduce
REFUSED_PREFIXES = {
    "batch_encoder.": "batch-label embeddings (use_batch_labels)",
    "dsbn.": "domain-specific batch norm",
    "bn.": "batch norm over the embeddings",
    "pert_encoder.": "perturbation-flag embeddings (scGPT's generation model)",
    "mvc_decoder.fc1.": "a non-inner-product MVC decoder",
    "transformer_encoder.fast_transformer_encoder.": "the linear-attention backend",
}
LAYER_KEY = re.compile(r"^transformer_encoder\.layers\.(\d+)\.(.+)$")


def unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded ``best_model.pt`` (a raw state dict, or one under a common key)."""
    if isinstance(obj, dict):
        for key in ("model_state_dict", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError("the scGPT checkpoint does not hold a state dict of tensors (best_model.pt).")
    return {k.removeprefix("module."): v for k, v in obj.items()}  # DDP-wrapped saves


def scgpt_config(state: dict[str, torch.Tensor], args: dict, *, pad_token_id: int, cls_token_id: int,
                 mask_token_id: int | None = None) -> CellTransformerConfig:
    """The CellTransformerConfig reproducing the scGPT model of ``state`` and ``args.json``."""
    if "encoder.embedding.weight" not in state:
        raise ConversionError("not an scGPT state dict: encoder.embedding.weight is missing.")
    vocab_size, d_model = state["encoder.embedding.weight"].shape
    layers = sorted({int(m.group(1)) for k in state if (m := LAYER_KEY.match(k))})
    if not layers:
        raise ConversionError("the scGPT state dict has no transformer_encoder.layers.* weights.")
    checks = {"embsize": d_model, "nlayers": len(layers), "d_hid": state["transformer_encoder.layers.0.linear1.weight"].shape[0]}
    for name, found in checks.items():
        if name in args and int(args[name]) != int(found):
            raise ConversionError(f"args.json says {name}={args[name]} but the weights have {found}; they do not belong together.")
    if "nheads" not in args:
        raise ConversionError("args.json lacks 'nheads' (the number of attention heads cannot be read from the weights).")
    style = args.get("input_emb_style", "continuous")
    if style != "continuous":
        raise ConversionError(f"input_emb_style={style!r}: only scGPT's continuous value encoding (its released models) converts.")
    if args.get("cell_emb_style", "cls") != "cls":
        raise ConversionError(f"cell_emb_style={args['cell_emb_style']!r}: only '<cls>' cell embeddings convert.")
    if args.get("pre_norm", False):
        raise ConversionError("pre_norm=True: scGPT's flash pre-norm layer has no exact counterpart; only post-norm converts.")
    dropout = float(args.get("dropout", 0.2))
    return CellTransformerConfig(
        vocab_size=int(vocab_size), d_model=int(d_model), n_layers=len(layers), n_heads=int(args["nheads"]),
        d_ff=int(checks["d_hid"]), dropout=dropout, attention_dropout=dropout, norm_first=False, activation="relu",
        layer_norm_eps=1e-5, value_encoding="continuous", n_bins=int(args.get("n_bins", 51)), value_clamp=512.0,
        gene_embedding_norm=True, embedding_norm=False, embedding_dropout="values", max_position_embeddings=0,
        pooling="cls", value_head="mse", gene_head=False, mvc_head="mvc_decoder.W.weight" in state,
        pad_token_id=pad_token_id, cls_token_id=cls_token_id, mask_token_id=mask_token_id,
        architectures=["CellTransformerForPretraining"],
    )


def map_scgpt_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Rename scGPT weights to atlasformer's; returns ``(new_state, {"dropped": [...], "reasons": [...]})``."""
    refused = sorted({why for key in state for prefix, why in REFUSED_PREFIXES.items() if key.startswith(prefix)})
    if refused:
        raise ConversionError(f"this scGPT checkpoint uses {', '.join(refused)}, which atlasformer does not reproduce.")
    new: dict[str, torch.Tensor] = {}
    dropped, reasons, unknown = [], set(), []
    for key, tensor in state.items():
        if (m := LAYER_KEY.match(key)) and m.group(2) in LAYER_MAP:
            new[f"backbone.encoder.layers.{m.group(1)}.{LAYER_MAP[m.group(2)]}"] = tensor
        elif key == "mvc_decoder.W.weight":
            # scGPT: <W q, c>; ours: <q, K c + b>  =>  K = W^T, b = 0
            new["mvc_head.cell_key.weight"] = tensor.t().contiguous()
            new["mvc_head.cell_key.bias"] = torch.zeros(tensor.shape[1], dtype=tensor.dtype)
        elif prefix := next((p for p in PREFIX_MAP if key.startswith(p)), None):
            new[PREFIX_MAP[prefix] + key[len(prefix):]] = tensor
        elif prefix := next((p for p in DROPPED_PREFIXES if key.startswith(p)), None):
            dropped.append(key)
            reasons.add(DROPPED_PREFIXES[prefix])
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"unrecognised scGPT weights {unknown[:5]} ({len(unknown)} in all); not converting a model "
                              "whose outputs could differ.")
    return new, {"dropped": sorted(dropped), "reasons": sorted(reasons)}


def convert_scgpt_weights(state: dict[str, torch.Tensor], args: dict, *, pad_token_id: int, cls_token_id: int,
                          mask_token_id: int | None = None) -> tuple[CellTransformerConfig, dict[str, torch.Tensor], dict]:
    """The CellTransformerForPretraining config and state dict equal to scGPT's model; ``(config, state, report)``."""
    state = unwrap_state_dict(state)
    config = scgpt_config(state, args, pad_token_id=pad_token_id, cls_token_id=cls_token_id, mask_token_id=mask_token_id)
    mapped, report = map_scgpt_state_dict(state)
    if "value_head.net.0.weight" not in mapped:
        raise ConversionError("the scGPT checkpoint has no expression decoder (decoder.fc.*); cannot convert.")
    report["n_tensors"] = len(state)
    return config, mapped, report
