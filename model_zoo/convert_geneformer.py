"""Weight half of the Geneformer converter: a BERT state dict and ``config.json`` -> a CellTransformerConfig and state dict.

Geneformer is a ``BertForMaskedLM``: word + position + token-type embeddings summed, LayerNorm,
post-norm encoder layers, and the MLM head dense - activation - LayerNorm - decoder. It maps onto the
CellTransformer with ``value_encoding="none"``, ``gene_embedding_norm=False``, ``embedding_norm=True``,
absolute positions and the masked-gene head. Inputs never carry a token type, so token-type
embedding 0 is folded into the position embeddings (every position adds both).

==============================================  ==============================================
BERT (``bert.`` prefix optional)                 atlasformer
==============================================  ==============================================
embeddings.word_embeddings                      backbone.embeddings.genes
embeddings.position_embeddings (+ type 0)       backbone.embeddings.positions
embeddings.LayerNorm                            backbone.embeddings.norm
encoder.layer.i.attention.self.query/key/value  backbone.encoder.layers.i.attention.in_proj (stacked)
encoder.layer.i.attention.output.dense          backbone.encoder.layers.i.attention.out_proj
encoder.layer.i.attention.output.LayerNorm      backbone.encoder.layers.i.norm1
encoder.layer.i.intermediate.dense              backbone.encoder.layers.i.linear1
encoder.layer.i.output.dense / LayerNorm        backbone.encoder.layers.i.linear2 / norm2
cls.predictions.transform.dense / LayerNorm     gene_head.dense / norm
cls.predictions.decoder (tied) + bias           gene_head.decoder
==============================================  ==============================================

Pure torch: no files are read here. ``atlasformer.checkpoints.geneformer`` reads ``config.json`` and the
weights (safetensors, or ``pytorch_model.bin`` only through ``torch.load(weights_only=True)``), loads the
mapped state strictly and writes the model folder. What cannot be reproduced raises :class:`ConversionError`.
"""

from __future__ import annotations

import re

import torch

from .cell_transformer import ACTIVATIONS, CellTransformerConfig, ConversionError

LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
LAYER_MAP = {
    "attention.output.dense.weight": "attention.out_proj.weight",
    "attention.output.dense.bias": "attention.out_proj.bias",
    "attention.output.LayerNorm.weight": "norm1.weight",
    "attention.output.LayerNorm.bias": "norm1.bias",
    "intermediate.dense.weight": "linear1.weight",
    "intermediate.dense.bias": "linear1.bias",
    "output.dense.weight": "linear2.weight",
    "output.dense.bias": "linear2.bias",
    "output.LayerNorm.weight": "norm2.weight",
    "output.LayerNorm.bias": "norm2.bias",
}
HEAD_MAP = {
    "cls.predictions.transform.dense.weight": "gene_head.dense.weight",
    "cls.predictions.transform.dense.bias": "gene_head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "gene_head.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "gene_head.norm.bias",
}
# weights of other BERT heads: not part of the masked-gene model, listed in the report
DROPPED_PREFIXES = ("pooler.", "classifier.", "cls.seq_relationship.", "embeddings.position_ids")
UNSEEN_LOGIT = -1e4  # bias of tokens added by the converter: never a prediction target


def check_bert_config(cfg: dict, source: str = "config.json") -> dict:
    """``cfg`` (a BERT ``config.json`` as a dict), checked to be a model the converter reproduces."""
    if cfg.get("model_type") != "bert":
        raise ConversionError(f"{source}: model_type is {cfg.get('model_type')!r}, not 'bert' (Geneformer).")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"{source}: position_embedding_type={cfg['position_embedding_type']!r}; only absolute converts.")
    if cfg.get("hidden_act", "gelu") not in ACTIVATIONS:
        raise ConversionError(f"{source}: hidden_act={cfg['hidden_act']!r}; only {sorted(ACTIVATIONS)} convert exactly.")
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        raise ConversionError(f"{source}: a BERT decoder or cross-attention model is not Geneformer.")
    return cfg


def geneformer_config(bert: dict, *, vocab_size: int, pad_token_id: int, cls_token_id: int, mask_token_id: int | None,
                      pooling: str, mlm_head: bool = True) -> CellTransformerConfig:
    """CellTransformerConfig reproducing the BERT of ``bert`` (its config.json) over ``vocab_size`` tokens."""
    act = bert.get("hidden_act", "gelu")
    return CellTransformerConfig(
        vocab_size=vocab_size, d_model=int(bert["hidden_size"]), n_layers=int(bert["num_hidden_layers"]),
        n_heads=int(bert["num_attention_heads"]), d_ff=int(bert["intermediate_size"]),
        dropout=float(bert.get("hidden_dropout_prob", 0.1)), attention_dropout=float(bert.get("attention_probs_dropout_prob", 0.1)),
        norm_first=False, activation=act, layer_norm_eps=float(bert.get("layer_norm_eps", 1e-12)), value_encoding="none",
        gene_embedding_norm=False, embedding_norm=True, embedding_dropout="sum",
        max_position_embeddings=int(bert["max_position_embeddings"]), pooling=pooling, value_head="none", gene_head=mlm_head,
        gene_head_activation=act, mvc_head=False, pad_token_id=pad_token_id, cls_token_id=cls_token_id,
        mask_token_id=mask_token_id, architectures=["CellTransformerForPretraining"],
    )


def map_bert_state_dict(state: dict[str, torch.Tensor], n_added_tokens: int = 0) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename BERT weights to atlasformer's, stacking q/k/v and folding token type 0; returns ``(state, dropped)``."""
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    if "embeddings.word_embeddings.weight" not in state:
        raise ConversionError("not a BERT state dict: embeddings.word_embeddings.weight is missing.")
    words = state["embeddings.word_embeddings.weight"]
    new = {
        "backbone.embeddings.genes.weight": _extend_rows(words, n_added_tokens, 0.0),
        "backbone.embeddings.positions.weight": state["embeddings.position_embeddings.weight"]
        + state["embeddings.token_type_embeddings.weight"][0],
        "backbone.embeddings.norm.weight": state["embeddings.LayerNorm.weight"],
        "backbone.embeddings.norm.bias": state["embeddings.LayerNorm.bias"],
    }
    layers = sorted({int(m.group(1)) for k in state if (m := LAYER_KEY.match(k))})
    for i in layers:
        src, dst = f"encoder.layer.{i}.", f"backbone.encoder.layers.{i}."
        for part in ("weight", "bias"):
            new[f"{dst}attention.in_proj.{part}"] = torch.cat(
                [state[f"{src}attention.self.{name}.{part}"] for name in ("query", "key", "value")])
        for suffix, target in LAYER_MAP.items():
            new[dst + target] = state[src + suffix]
    for key, target in HEAD_MAP.items():
        if key in state:
            new[target] = state[key]
    if "gene_head.dense.weight" in new:
        decoder = state.get("cls.predictions.decoder.weight", words)  # tied to the word embeddings by default
        bias = state.get("cls.predictions.bias", state.get("cls.predictions.decoder.bias"))
        if bias is None:
            raise ConversionError("the BERT MLM head has no bias (cls.predictions.bias).")
        new["gene_head.decoder.weight"] = _extend_rows(decoder, n_added_tokens, 0.0)
        new["gene_head.decoder.bias"] = _extend_rows(bias, n_added_tokens, UNSEEN_LOGIT)
    used = {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
            "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias",
            "cls.predictions.decoder.weight", "cls.predictions.bias", "cls.predictions.decoder.bias", *HEAD_MAP}
    dropped = [k for k in state if k not in used and not LAYER_KEY.match(k)]
    unknown = [k for k in dropped if not k.startswith(DROPPED_PREFIXES)]
    if unknown:
        raise ConversionError(f"unrecognised BERT weights {unknown[:5]}; not converting a model whose outputs could differ.")
    return new, sorted(dropped)


def _extend_rows(tensor: torch.Tensor, n: int, fill: float) -> torch.Tensor:
    """``tensor`` with ``n`` rows of ``fill`` appended along dim 0 (for tokens the converter adds)."""
    if n == 0:
        return tensor
    return torch.cat([tensor, torch.full((n, *tensor.shape[1:]), fill, dtype=tensor.dtype)])


def convert_geneformer_weights(state: dict[str, torch.Tensor], bert: dict, *, pad_token_id: int, cls_token_id: int,
                               mask_token_id: int | None, n_added_tokens: int = 0, pooling: str = "cls",
                               ) -> tuple[CellTransformerConfig, dict[str, torch.Tensor], dict]:
    """The CellTransformerForPretraining config and state dict equal to Geneformer's BERT; ``(config, state, report)``.

    ``n_added_tokens`` rows (e.g. a ``<cls>`` that a Geneformer V1 dictionary lacks) are appended to the
    vocabulary with zero embeddings and a logit that is never predicted.
    """
    vocab_size = int(bert["vocab_size"]) + n_added_tokens
    if state.get("bert.embeddings.word_embeddings.weight", state.get("embeddings.word_embeddings.weight")) is None:
        raise ConversionError("not a BERT state dict: embeddings.word_embeddings.weight is missing.")
    mapped, dropped = map_bert_state_dict(state, n_added_tokens)
    rows = mapped["backbone.embeddings.genes.weight"].shape[0]
    if rows != vocab_size:
        raise ConversionError(f"config.json says vocab_size={bert['vocab_size']} but the embeddings have "
                              f"{rows - n_added_tokens} rows.")
    config = geneformer_config(bert, vocab_size=vocab_size, pad_token_id=pad_token_id, cls_token_id=cls_token_id,
                               mask_token_id=mask_token_id, pooling=pooling,
                               mlm_head="gene_head.dense.weight" in mapped)  # a BertModel folder has no MLM head
    return config, mapped, {"dropped": dropped, "n_added_tokens": n_added_tokens, "n_tensors": len(state)}
