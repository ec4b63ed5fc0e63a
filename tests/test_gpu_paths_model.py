"""Issue 14 (model side): batch width vs position table, attention kernels and the variable-length path,
masked heads at target positions only, and objectives missing from the config being off."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atlasformer.config import load_config
from atlasformer.model_zoo import CellTransformerConfig, CellTransformerForPretraining
from atlasformer.model_zoo.cell_transformer import masked_sum_loss, training_flops
from atlasformer.pretrain.config import PretrainConfig
from atlasformer.pretrain.train import make_model
from atlasformer.tokenization import CellTokenizer, GeneVocab, TokenizedCells, collate

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))
TINY = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.d_ff=32"]


def tiny(**kw):
    return CellTransformerConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, n_bins=11, dropout=0.0, **kw)


def padded_batch(seed=0, b=3, s=10):
    """(ids, values, mask) with <cls> first; cells 0 and 2 padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (b, s), generator=g)
    ids[:, 0] = 1
    values = torch.randint(1, 11, (b, s), generator=g).float()
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, 6:] = mask[2, 8:] = False
    ids[~mask], values[~mask] = 0, 0.0
    return ids, values, mask


def cells_of(lengths, vocab_size=20, seed=0) -> TokenizedCells:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    return TokenizedCells(offsets, rng.integers(3, vocab_size, n).astype(np.int32),
                          rng.random(n).astype(np.float32), np.arange(len(lengths), dtype=np.int64))


class SDPASpy:
    """Records the ``attn_mask`` of every scaled_dot_product_attention call, then runs the real one."""

    def __init__(self, monkeypatch):
        self.masks, self.real = [], F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention", self)

    def __call__(self, q, k, v, attn_mask=None, **kw):
        self.masks.append(attn_mask)
        return self.real(q, k, v, attn_mask=attn_mask, **kw)


# ------------------------------------------------------------------ 1. batch width vs position table
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_cell_at_max_seq_len_fits_the_model(recipe):
    """A cell of exactly max_seq_len genes, collated as pretraining does, fits the model pretraining builds."""
    cfg = load_config(PretrainConfig, recipe, overrides=TINY)
    vocab = GeneVocab([f"G{i}" for i in range(17)], specials=cfg.tokenizer.special_tokens)
    medians = {g: 1.0 for g in vocab.genes} if cfg.tokenizer.kind == "rank" else None
    tokenizer = CellTokenizer(vocab, cfg.tokenizer, medians)
    model = make_model(cfg, tokenizer, 0).eval()
    n = cfg.tokenizer.max_seq_len
    cells = cells_of([n, 5], vocab_size=len(vocab))
    batch = collate(cells, np.array([1, 0]), cls_id=vocab.cls_id, pad_id=vocab.pad_id)
    batch.pop("rows")
    with torch.no_grad():
        out = model(**batch)
    assert out.hidden_states.shape[:2] == (2, n + 1)


def test_collate_rounds_up_but_never_past_the_cap():
    cells = cells_of([5, 12, 30])
    kw = {"cls_id": 1, "pad_id": 0}
    assert collate(cells, np.array([0, 1]), **kw)["input_ids"].shape[1] == 16  # 13 rounded up to 8s
    assert collate(cells, np.array([0, 1]), max_width=14, **kw)["input_ids"].shape[1] == 14
    assert collate(cells_of([5, 12]), np.array([0, 1]), **kw)["input_ids"].shape[1] == 13  # no cell is longer
    with pytest.raises(ValueError, match="max_width"):
        collate(cells, np.array([2]), max_width=16, **kw)


# ------------------------------------------------------------------ 5. attention kernels, varlen path
def test_unpadded_batch_passes_no_mask_to_sdpa(monkeypatch):
    spy = SDPASpy(monkeypatch)
    model = CellTransformerForPretraining(tiny()).eval()
    ids, values, mask = padded_batch()
    full = torch.ones_like(mask)
    with torch.no_grad():
        model(ids, values, full)
    assert len(spy.masks) == 2 and all(m is None for m in spy.masks)
    spy.masks.clear()
    with torch.no_grad():
        model(ids, values, mask)
    assert all(m is not None for m in spy.masks)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on CPU, by design
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_flex_attention_matches_masked_sdpa(monkeypatch, pooling):
    sdpa = CellTransformerForPretraining(tiny(pooling=pooling, norm_first=False)).eval()
    flex = CellTransformerForPretraining(tiny(pooling=pooling, norm_first=False, attention_impl="flex")).eval()
    flex.load_state_dict(sdpa.state_dict())
    ids, values, mask = padded_batch()
    with torch.no_grad():
        ref = sdpa(ids, values, mask)
        spy = SDPASpy(monkeypatch)
        out = flex(ids, values, mask)
    assert spy.masks == []  # padded batches go through flex_attention, not SDPA with a mask
    torch.testing.assert_close(out.hidden_states[mask], ref.hidden_states[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cell_embedding, ref.cell_embedding, atol=1e-5, rtol=1e-5)
    # FlexAttention has no CPU backward: training on CPU falls back to masked SDPA
    flex.train()(ids, values, mask).cell_embedding.sum().backward()
    assert flex.backbone.encoder.layers[0].attention.in_proj.weight.grad is not None


def test_attention_impl_is_validated_reachable_from_pretrain_config_and_saved(tmp_path):
    with pytest.raises(ValueError, match="attention_impl"):
        CellTransformerConfig(attention_impl="ring")
    with pytest.raises(ValueError, match="attention_dropout"):
        CellTransformerConfig(attention_impl="flex", attention_dropout=0.1)
    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "tiny.yaml", overrides=["model.attention_impl=flex"])
    vocab = GeneVocab([f"G{i}" for i in range(17)])
    model = make_model(cfg, CellTokenizer(vocab, cfg.tokenizer), 0)
    assert model.config.attention_impl == "flex"
    model.save_pretrained(tmp_path)
    assert CellTransformerForPretraining.from_pretrained(tmp_path).config.attention_impl == "flex"


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's own per-kernel reasons
def test_flash_without_a_kernel_says_why_and_how_to_fix():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from atlasformer.model_zoo.attention import no_kernel_message

    # a real failure on CPU: its flash kernel takes masks but no attention dropout
    model = CellTransformerForPretraining(tiny(attention_dropout=0.1)).train()
    ids, values, mask = padded_batch()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), pytest.raises(RuntimeError, match="sdpa_backend=auto") as err:
        model(ids, values, mask)
    assert "dropout" in str(err.value) and "No available kernel" in str(err.value.__cause__)
    # on CUDA the padding mask is what flash refuses
    message = no_kernel_message("cuda", torch.bfloat16, masked=True, dropout_p=0.0, allowed=["flash"])
    assert "padding" in message and "attention_impl=flex" in message and "sdpa_backend=auto" in message
    message = no_kernel_message("cuda", torch.float32, masked=False, dropout_p=0.0, allowed=["flash"])
    assert "fp16/bf16" in message and "padding" not in message


# ------------------------------------------------------------------ 7c. heads at target positions only
def test_heads_run_at_target_positions_only_with_the_same_loss():
    model = CellTransformerForPretraining(tiny(gene_head=True, mvc_head=True)).eval()
    ids, values, mask = padded_batch()
    targets = torch.zeros_like(mask)
    targets[:, 2] = targets[1, 7] = True
    n_targets = int(targets.sum())
    seen = {}
    for name, module in {"gene": model.gene_head.decoder, "value": model.value_head.net[-1],
                         "mvc": model.mvc_head.gene_query}.items():
        module.register_forward_hook(lambda m, args, out, name=name: seen.update({name: tuple(args[0].shape)}))
    with torch.no_grad():
        out = model(ids, values, mask, value_targets=values, gene_targets=ids, target_mask=targets)
    assert seen == {"gene": (n_targets, 32), "value": (n_targets, 32), "mvc": (n_targets, 32)}
    # the same losses computed at every position
    hidden, cell = out.hidden_states, out.cell_embedding
    with torch.no_grad():
        value = F.cross_entropy(model.value_head(hidden).transpose(1, 2), values.long(), reduction="none")
        gene = F.cross_entropy(model.gene_head(hidden).transpose(1, 2), ids, reduction="none")
        mvc = (model.mvc_head(model.backbone.embeddings.gene_embedding(ids), cell) - values) ** 2
    for name, per_token in {"masked_value": value, "masked_gene": gene, "mvc": mvc}.items():
        torch.testing.assert_close(out.loss_terms[name], masked_sum_loss(per_token, targets, None), atol=1e-6, rtol=0)
    # without targets every position is predicted (converted-model parity, inspection)
    with torch.no_grad():
        full = model(ids, values, mask)
    assert full.logits.shape == (3, 10, 11) and full.extras["gene_logits"].shape == (3, 10, 40)


def test_training_flops_count_heads_at_targets():
    config = CellTransformerConfig(d_model=32, n_layers=2, n_heads=2, n_bins=11, value_head="bins", gene_head=True,
                                   vocab_size=50, value_encoding="continuous")
    d, lengths, targets = 32, torch.tensor([10, 30]), torch.tensor([4, 12])
    heads = 2 * (2 * d * d + d * 11) + 2 * (d * d + d * 50)
    encoder_and_input = training_flops(config, lengths) / 3 - 40 * heads
    assert training_flops(config, lengths, targets) == pytest.approx(3 * (encoder_and_input + 16 * heads))


# ------------------------------------------------------------------ 8c. a missing objective is off
def test_objectives_missing_from_the_weights_are_off():
    model = CellTransformerForPretraining(tiny(mvc_head=True)).eval()
    ids, values, mask = padded_batch()
    targets = torch.zeros_like(mask)
    targets[:, 2] = True
    kw = {"value_targets": values, "target_mask": targets}
    calls = []
    model.value_head.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        both = model(ids, values, mask, **kw)  # no weights: every head's objective at weight 1
        only_mvc = model(ids, values, mask, objective_weights={"mvc": 1.0}, **kw)
        half = model(ids, values, mask, objective_weights={"masked_value": 0.5, "mvc": 0.0}, **kw)
    assert len(calls) == 2  # the value head did not run for the mvc-only forward
    assert set(both.loss_terms) == {"masked_value", "mvc"} and set(only_mvc.loss_terms) == {"mvc"}
    torch.testing.assert_close(only_mvc.loss, both.loss_terms["mvc"])
    assert set(half.loss_terms) == {"masked_value"}
    torch.testing.assert_close(half.loss, 0.5 * both.loss_terms["masked_value"])
