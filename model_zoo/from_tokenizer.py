"""The model settings a tokenizer decides: derived in one place, and checked whenever a model meets a tokenizer.

A CellTransformer reads what a tokenizer writes: token ids below the vocabulary size with its special ids,
values as bin ids, continuous values or none (rank order), and for rank input one position per gene. Pretraining,
fine-tuning from scratch and loading a model folder all go through :func:`config_for_tokenizer` and
:func:`tokenizer_mismatches`, so these settings have one source. model_zoo never imports the tokenizer package:
a tokenizer is read by its attributes (``tokenizer.vocab``, ``tokenizer.config``).
"""

from __future__ import annotations

from .cell_transformer import CellTransformerConfig

VALUE_ENCODING = {"binned": "category", "continuous": "continuous", "rank": "none"}
"""Tokenizer kind -> the value encoding a new model gets."""
READABLE = {"binned": {"category", "continuous"}, "continuous": {"continuous"}, "rank": {"none"}}
"""Tokenizer kind -> the value encodings that read it (scGPT's continuous encoder also reads bin ids as numbers)."""
VALUE_HEAD = {"binned": "bins", "continuous": "mse", "rank": "none"}
"""Tokenizer kind -> the masked-value head that predicts its values."""


def tokenizer_settings(tokenizer) -> dict:
    """The CellTransformerConfig fields ``tokenizer`` decides (vocabulary, special ids, values, positions)."""
    cfg, vocab = tokenizer.config, tokenizer.vocab
    return {"vocab_size": len(vocab), "n_bins": cfg.n_bins, "pad_token_id": vocab.pad_id, "cls_token_id": vocab.cls_id,
            "mask_token_id": vocab.mask_id, "value_encoding": VALUE_ENCODING[cfg.kind],
            # rank input encodes order by position: one per gene plus <cls>
            "max_position_embeddings": cfg.max_seq_len + 1 if cfg.kind == "rank" else 0}


def config_for_tokenizer(tokenizer, **fields) -> CellTransformerConfig:
    """A model config for ``tokenizer``: its settings (:func:`tokenizer_settings`), then ``fields`` (the shape,
    heads, conditions). A field that contradicts the tokenizer is an error naming both values."""
    config = CellTransformerConfig(**{**tokenizer_settings(tokenizer), **fields})
    problems = tokenizer_mismatches(config, tokenizer)
    if problems:
        raise ValueError(f"model settings contradict the tokenizer: {'; '.join(problems)}. Leave these fields to the "
                         "tokenizer (remove them from the model settings) or change the tokenizer.")
    return config


def tokenizer_mismatches(config: CellTransformerConfig, tokenizer) -> list[str]:
    """What of ``tokenizer``'s output a model built from ``config`` cannot read; empty when they fit."""
    want = tokenizer_settings(tokenizer)
    problems = []
    if config.vocab_size != want["vocab_size"]:
        problems.append(f"the vocabulary has {want['vocab_size']} tokens but the model was built for {config.vocab_size}")
    for name in ("pad_token_id", "cls_token_id", "mask_token_id"):
        if getattr(config, name) is not None and getattr(config, name) != want[name]:
            problems.append(f"{name} is {getattr(config, name)} in the model but {want[name]} in the vocabulary")
    if config.value_encoding not in READABLE[tokenizer.config.kind]:
        problems.append(f"the tokenizer writes {tokenizer.config.kind} values, which the model's value_encoding "
                        f"{config.value_encoding!r} does not read (it reads {want['value_encoding']!r})")
    elif config.value_encoding == "category" and config.n_bins != want["n_bins"]:
        problems.append(f"the tokenizer writes {want['n_bins']} bins but the model embeds {config.n_bins}")
    positions = config.max_position_embeddings
    if positions and tokenizer.config.max_seq_len + 1 > positions:
        problems.append(f"{tokenizer.config.max_seq_len} genes per cell (+ <cls>) exceed the model's {positions} "
                        f"positions; set max_seq_len to at most {positions - 1}")
    return problems
