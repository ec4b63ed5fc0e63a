"""Masking for the pretraining objectives: which positions are hidden and what the model must predict."""

from __future__ import annotations

import torch


def mask_batch(batch: dict[str, torch.Tensor], *, mask_ratio: float, mask_value: float, mask_token_id: int | None,
               mask_genes: bool, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Choose ``mask_ratio`` of each cell's gene positions (never <cls> or padding) and hide them.

    Values at chosen positions become ``mask_value`` (masked-value objective); with ``mask_genes`` the
    gene ids become ``<mask>`` instead (masked-gene objective, rank-value input). Returns a new batch
    with ``value_targets``, ``gene_targets`` and ``target_mask`` (batch, seq) added.
    """
    attention = batch["attention_mask"]
    candidates = attention.clone()
    candidates[:, 0] = False  # <cls>
    scores = torch.rand(candidates.shape, generator=generator)
    scores[~candidates] = 2.0
    n_genes = candidates.sum(1)  # (batch,)
    n_mask = torch.clamp((n_genes.float() * mask_ratio).round().long(), min=1) * (n_genes > 0)
    ranks = scores.argsort(1).argsort(1)  # rank of each position's score within its cell
    target_mask = (ranks < n_mask[:, None]) & candidates  # (batch, seq)
    out = dict(batch)
    out["value_targets"] = batch["values"].clone()
    out["gene_targets"] = batch["input_ids"].clone()
    out["target_mask"] = target_mask
    if mask_genes:
        out["input_ids"] = batch["input_ids"].masked_fill(target_mask, mask_token_id)
    else:
        out["values"] = batch["values"].masked_fill(target_mask, mask_value)
    return out
