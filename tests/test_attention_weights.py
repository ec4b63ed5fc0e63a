"""output_attentions=True: each layer's attention weights from an explicit softmax, computed only when asked, that
reproduce the fused (SDPA / FlexAttention) forward and put no weight on padding."""

from collections import defaultdict

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from atlasformer.analysis.attention import attention_network
from atlasformer.model_zoo import CellTransformerConfig, CellTransformerForPretraining
from atlasformer.model_zoo.from_tokenizer import config_for_tokenizer
from atlasformer.tokenization import (
    CellTokenizer,
    GeneVocab,
    InputError,
    TokenizerConfig,
    collate,
    tokenize_anndata,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}


def tiny(**kw):
    return CellTransformerConfig(vocab_size=40, d_model=32, n_layers=3, n_heads=4, n_bins=11, dropout=0.0, **kw)


def padded_batch(seed=0, b=4, s=12):
    """(ids, values, mask) with <cls> first; cells 0 and 2 padded, cell 1 of one real token past <cls>."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (b, s), generator=g)
    ids[:, 0] = 1
    values = torch.randint(1, 11, (b, s), generator=g).float()
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, 7:] = mask[1, 2:] = mask[2, 9:] = False
    ids[~mask], values[~mask] = 0, 0.0
    return ids, values, mask


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_norm", "post_norm"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_weights_path_reproduces_the_sdpa_forward(norm_first, pooling, padded):
    model = CellTransformerForPretraining(tiny(norm_first=norm_first, pooling=pooling)).eval()
    ids, values, mask = padded_batch()
    if not padded:
        mask = torch.ones_like(mask)
    with torch.no_grad():
        ref = model(ids, values, mask)
        out = model(ids, values, mask, output_attentions=True)
    assert ref.attentions is None  # computed only when asked
    real = mask  # padded positions' outputs are never read (the pooling masks them)
    torch.testing.assert_close(out.hidden_states[real], ref.hidden_states[real], **TOL)
    torch.testing.assert_close(out.cell_embedding, ref.cell_embedding, **TOL)
    torch.testing.assert_close(out.logits[real], ref.logits[real], **TOL)
    assert len(out.attentions) == 3 and all(a.shape == (4, 4, 12, 12) for a in out.attentions)


def test_rows_sum_to_one_over_real_keys_and_padding_gets_zero():
    model = CellTransformerForPretraining(tiny()).eval()
    ids, values, mask = padded_batch()
    with torch.no_grad():
        attentions = model(ids, values, mask, output_attentions=True).attentions
    key_real = mask[:, None, None, :].expand_as(attentions[0])  # (batch, heads, seq, seq)
    for weights in attentions:
        assert weights.dtype == torch.float32 and (weights >= 0).all()
        assert torch.all(weights[~key_real] == 0)  # exactly zero, not small
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:3]), **TOL)
    # cell 1 has <cls> and one gene: every query splits its attention between those two keys only
    assert torch.all(attentions[-1][1, :, :, 2:] == 0) and torch.all(attentions[-1][1, :, :, :2] > 0)


def test_weights_are_what_the_layer_mixes_values_with():
    """The returned weights are the ones used: recomputing layer 0's attention output from them and V matches."""
    model = CellTransformerForPretraining(tiny(norm_first=True)).eval()
    ids, values, mask = padded_batch()
    block = model.backbone.encoder.layers[0]
    with torch.no_grad():
        weights = model(ids, values, mask, output_attentions=True).attentions[0]  # (batch, heads, seq, seq)
        x = block.norm1(model.backbone.embeddings(ids, values))
        b, s, d = x.shape
        v = block.attention.in_proj(x).view(b, s, 3, 4, d // 4)[:, :, 2].transpose(1, 2)  # (batch, heads, seq, hd)
        mixed = block.attention.out_proj((weights @ v).transpose(1, 2).reshape(b, s, d))
        expected, _ = block.attention(x, mask[:, None, None, :])
    torch.testing.assert_close(mixed[mask], expected[mask], **TOL)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on CPU, by design
def test_flex_models_return_the_same_weights_and_states():
    sdpa = CellTransformerForPretraining(tiny()).eval()
    flex = CellTransformerForPretraining(tiny(attention_impl="flex")).eval()
    flex.load_state_dict(sdpa.state_dict())
    ids, values, mask = padded_batch()
    with torch.no_grad():
        fused = flex(ids, values, mask)  # FlexAttention with a block mask
        ref = sdpa(ids, values, mask, output_attentions=True)
        out = flex(ids, values, mask, output_attentions=True)  # the dense bool mask, not the block mask
    torch.testing.assert_close(out.cell_embedding, fused.cell_embedding, **TOL)
    torch.testing.assert_close(out.hidden_states[mask], fused.hidden_states[mask], **TOL)
    for a, b in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(a, b, **TOL)


def test_training_mode_is_refused_and_gradient_checkpointing_is_untouched():
    model = CellTransformerForPretraining(tiny())
    model.gradient_checkpointing_enable()
    ids, values, mask = padded_batch()
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        model.train()(ids, values, mask, output_attentions=True)
    # training with checkpointing still runs and gives gradients; eval with checkpointing on returns weights
    model(ids, values, mask).cell_embedding.sum().backward()
    assert model.backbone.encoder.layers[0].attention.in_proj.weight.grad is not None
    with torch.no_grad():
        out = model.eval()(ids, values, mask, output_attentions=True)
    assert len(out.attentions) == 3


def test_weights_stay_float32_under_autocast():
    model = CellTransformerForPretraining(tiny()).eval()
    ids, values, mask = padded_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(ids, values, mask)
        out = model(ids, values, mask, output_attentions=True)
    assert out.attentions[0].dtype == torch.float32  # softmax in float32 for analysis
    torch.testing.assert_close(out.cell_embedding.float(), ref.cell_embedding.float(), atol=5e-2, rtol=5e-2)


# ------------------------------------------------------------------ attention networks per population
def network_inputs(n_cells=24, n_genes=30, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(0.8, (n_cells, n_genes)).astype(np.float32)
    genes = [f"G{i}" for i in range(n_genes)]
    adata = ad.AnnData(sp.csr_matrix(x), obs=pd.DataFrame({"kind": np.repeat(["a", "b", "c"], n_cells // 3)},
                                                          index=[f"c{i}" for i in range(n_cells)]))
    adata.var_names = genes
    tokenizer = CellTokenizer(GeneVocab(genes), TokenizerConfig(n_bins=11, max_seq_len=16, gene_id_mode="raw"))
    torch.manual_seed(seed)
    model = CellTransformerForPretraining(config_for_tokenizer(tokenizer, d_model=32, n_layers=2, n_heads=4,
                                                               dropout=0.0)).eval()
    return adata, model, tokenizer


def brute_force_edges(adata, model, tokenizer, layer, head):
    """{(group, source, target): (mean weight, n_cells)} by looping over cells and token pairs one by one."""
    data = tokenize_anndata(adata, tokenizer)
    sums, counts = defaultdict(float), defaultdict(int)
    for i in range(len(data.cells)):
        batch = collate(data.cells, [i], cls_id=1, pad_id=0)
        batch.pop("rows")
        with torch.no_grad():
            weights = model(**batch, output_attentions=True).attentions[layer][0]  # (heads, seq, seq)
        weights = weights.mean(0) if head == "mean" else weights[head]
        names = [tokenizer.vocab.id_to_token[g] for g in data.cells.cell(i)[0]]
        group = data.obs["kind"].iloc[i]
        for q, source in enumerate(names):
            for k, target in enumerate(names):
                if q != k:
                    sums[group, source, target] += float(weights[1 + q, 1 + k])
                    counts[group, source, target] += 1
    return {key: (sums[key] / counts[key], counts[key]) for key in sums}


@pytest.mark.parametrize(("layer", "heads"), [(-1, "mean"), (0, 2)])
def test_attention_network_equals_a_pair_by_pair_average(layer, heads, tmp_path):
    adata, model, tokenizer = network_inputs()
    table = attention_network(adata, (model, tokenizer), groupby="kind", layer=layer, heads=heads, top_edges=10_000,
                              min_cells=1, batch_size=3, write=tmp_path / "edges.csv")
    expected = brute_force_edges(adata, model, tokenizer, layer, heads)
    assert len(table) == len(expected)  # every co-occurring pair, once per group
    for row in table.itertuples():
        weight, n_cells = expected[row.group, row.source_gene, row.target_gene]
        assert row.weight == pytest.approx(weight, abs=1e-6) and row.n_cells == n_cells
    assert pd.read_csv(tmp_path / "edges.csv").columns.tolist() == ["group", "source_gene", "target_gene", "weight",
                                                                     "n_cells"]


def test_attention_network_keeps_the_top_edges_of_each_group_and_head():
    adata, model, tokenizer = network_inputs()
    each = attention_network(adata, (model, tokenizer), groupby="kind", heads="each", top_edges=5, min_cells=3)
    assert each.columns.tolist() == ["group", "head", "source_gene", "target_gene", "weight", "n_cells"]
    assert each.groupby(["group", "head"]).size().tolist() == [5] * 12  # 3 groups x 4 heads
    assert (each["n_cells"] >= 3).all() and (each["source_gene"] != each["target_gene"]).all()
    every = attention_network(adata, (model, tokenizer), groupby="kind", heads="each", top_edges=10_000, min_cells=3)
    for (group, head), edges in each.groupby(["group", "head"]):
        best = every[(every["group"] == group) & (every["head"] == head)]["weight"].nlargest(5).to_numpy()
        assert edges["weight"].to_numpy() == pytest.approx(best)


def test_attention_network_refuses_bad_settings():
    adata, model, tokenizer = network_inputs()
    with pytest.raises(InputError, match="layer=5"):
        attention_network(adata, (model, tokenizer), groupby="kind", layer=5)
    with pytest.raises(InputError, match="heads"):
        attention_network(adata, (model, tokenizer), groupby="kind", heads=4)
    with pytest.raises(InputError, match="groupby"):
        attention_network(adata, (model, tokenizer), groupby="cell_type")
