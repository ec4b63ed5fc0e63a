"""In-silico perturbation: the perturbed tokens are what delete / over-express mean for each tokenizer kind, batched
results equal one-at-a-time results, and over-expressing a planted program moves cells toward the state that
expresses it (and deleting it moves them away) more than random genes do."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from atlasformer.analysis.perturb import perturb_genes, perturb_tokens, rank_genes_by_effect
from atlasformer.finetune.common import model_batch
from atlasformer.model_zoo import CellTransformerForPretraining
from atlasformer.model_zoo.from_tokenizer import config_for_tokenizer
from atlasformer.tokenization import (
    CellTokenizer,
    GeneVocab,
    InputError,
    TokenizedCells,
    TokenizerConfig,
    tokenize_anndata,
)

N_GENES = 60
GENES = [f"G{i}" for i in range(N_GENES)]
PROGRAM = GENES[:6]  # up in state B


def tokenizer_of(kind="binned", max_seq_len=40, n_bins=11):
    vocab = GeneVocab(GENES)
    medians = dict.fromkeys(GENES, 1.0) if kind == "rank" else None
    return CellTokenizer(vocab, TokenizerConfig(kind=kind, n_bins=n_bins, max_seq_len=max_seq_len, gene_id_mode="raw"),
                         medians)


def tiny_model(tokenizer, seed=0, **kw):
    """An untrained model: its embedding still pools the tokens it is given, which is what these tests need."""
    torch.manual_seed(seed)
    config = config_for_tokenizer(tokenizer, d_model=32, n_layers=2, n_heads=2, dropout=0.0, mvc_head=True, **kw)
    return CellTransformerForPretraining(config).eval()


def two_states(n_per_state=40, seed=0):
    """Counts of cells in state A and state B, which differ by an 8-fold higher program (PROGRAM) in B."""
    rng = np.random.default_rng(seed)
    rates = rng.gamma(2.0, 1.0, N_GENES)
    rates[:6] = 0.3  # the program is low in A ...
    state = np.repeat(["A", "B"], n_per_state)
    mean = np.tile(rates, (len(state), 1))
    mean[state == "B", :6] *= 8.0 * 8  # ... and high in B
    x = rng.poisson(mean).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(x), obs=pd.DataFrame({"state": state}, index=[f"c{i}" for i in range(len(x))]))
    adata.var_names = GENES
    return adata


# ------------------------------------------------------------------ token bookkeeping
def random_cells(kind, n_cells=30, max_len=12, n_bins=11, seed=0) -> TokenizedCells:
    """Cells of 1..max_len distinct genes; values as the tokenizer kind writes them (ties included)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, n_cells)
    lengths[:5] = max_len  # full cells: over-expression must trim them
    genes = np.concatenate([rng.choice(np.arange(3, 3 + N_GENES), n, replace=False) for n in lengths])
    if kind == "binned":
        values = rng.integers(1, n_bins, len(genes)).astype(np.float32)
    else:
        values = rng.choice([0.5, 1.0, 2.0, 3.5], len(genes)).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if kind == "rank":  # sorted by value, descending, within each cell
        for lo, hi in zip(offsets[:-1], offsets[1:]):
            order = lo + np.argsort(-values[lo:hi], kind="stable")
            genes[lo:hi], values[lo:hi] = genes[order], values[order]
    return TokenizedCells(offsets, genes.astype(np.int32), values, np.arange(n_cells, dtype=np.int64))


def reference(genes, values, set_ids, mode, kind, n_bins, max_len):
    """One cell, written out: what the perturbation means, token by token."""
    genes, values = list(genes), list(values)
    if mode == "delete":
        keep = [i for i, g in enumerate(genes) if g not in set_ids]
        return [genes[i] for i in keep], [values[i] for i in keep]
    top = n_bins - 1 if kind == "binned" else max(values)
    tokens = [(g, top if g in set_ids else v) for g, v in zip(genes, values)]
    inserted = [(g, top) for g in set_ids if g not in genes]
    if kind == "rank":  # the set first in its order, then the rest in rank order; trimmed from the end
        ordered = [(g, top) for g in set_ids] + [t for t in tokens if t[0] not in set_ids]
        ordered = ordered[:max_len]
    else:  # inserted genes after the cell's own; the lowest values (later ones among ties) dropped, never the set
        ordered = tokens + inserted
        while len(ordered) > max_len:
            candidates = [i for i, (g, _) in enumerate(ordered) if g not in set_ids]
            lowest = min(candidates, key=lambda i: (ordered[i][1], -i))
            ordered.pop(lowest)
    return [g for g, _ in ordered], [v for _, v in ordered]


@pytest.mark.parametrize("kind", ["binned", "continuous", "rank"])
@pytest.mark.parametrize("mode", ["delete", "overexpress"])
def test_vectorised_perturbation_equals_the_cell_by_cell_definition(kind, mode):
    max_len = 12
    tokenizer = tokenizer_of(kind, max_seq_len=max_len)
    cells = random_cells(kind, max_len=max_len)
    rng = np.random.default_rng(1)
    for trial in range(6):
        set_ids = rng.choice(np.arange(3, 3 + N_GENES), 1 + trial % 4, replace=False)  # single genes and sets
        rows = rng.permutation(len(cells))[:20]
        out = perturb_tokens(cells, rows, set_ids, mode, tokenizer)
        assert out.cells.cell_index.tolist() == rows.tolist()
        for copy, row in enumerate(rows):
            genes, values = cells.cell(row)
            want_genes, want_values = reference(genes, values, set(set_ids.tolist()) if mode == "delete" else
                                                set_ids.tolist(), mode, kind, tokenizer.config.n_bins, max_len)
            got_genes, got_values = out.cells.cell(copy)
            assert got_genes.tolist() == want_genes, (kind, mode, set_ids, row)
            np.testing.assert_array_equal(got_values, np.asarray(want_values, np.float32))
            assert out.n_expressed[copy] == np.isin(genes, set_ids).sum()
        # each kept token points at its source token, or is an inserted gene of the set
        lo = out.cells.offsets
        for copy in range(len(rows)):
            src = out.source[lo[copy]:lo[copy + 1]]
            own = src >= 0
            np.testing.assert_array_equal(cells.gene_ids[src[own]], out.cells.cell(copy)[0][own])
            assert np.isin(out.cells.cell(copy)[0][~own], set_ids).all()


def test_delete_removes_exactly_the_gene_and_overexpress_tops_it():
    adata = two_states()
    tokenizer = tokenizer_of()
    cells = tokenize_anndata(adata, tokenizer).cells
    gene = tokenizer.vocab.lookup(["G10"])[0]
    has = [i for i in range(len(cells)) if gene in cells.cell(i)[0]][:5]
    deleted = perturb_tokens(cells, np.array(has), np.array([gene]), "delete", tokenizer)
    raised = perturb_tokens(cells, np.array(has), np.array([gene]), "overexpress", tokenizer)
    for copy, row in enumerate(has):
        before = cells.cell(row)[0]
        after = deleted.cells.cell(copy)[0]
        assert gene not in after and len(after) == len(before) - 1 and set(before) - set(after) == {gene}
        g, v = raised.cells.cell(copy)
        assert v[g == gene].tolist() == [tokenizer.config.n_bins - 1]
        np.testing.assert_array_equal(v[g != gene], cells.cell(row)[1][before != gene])


# ------------------------------------------------------------------ model passes
def test_batched_results_equal_one_at_a_time_and_a_direct_forward():
    adata = two_states(n_per_state=12)
    tokenizer = tokenizer_of()
    pair = (tiny_model(tokenizer), tokenizer)
    genes = ["G0", "G20", ["G1", "G30", "G31"]]
    together = perturb_genes(adata, pair, genes, mode="overexpress", target="state=B", batch_size=7)
    assert together.attrs["n_copies"] == 3 * adata.n_obs and together.attrs["genes_x_cells_per_s"] > 0
    assert together.attrs["expression_head"] == "mvc"
    for gene in genes:
        alone = perturb_genes(adata, pair, [gene], mode="overexpress", target="state=B", batch_size=1)
        name = gene if isinstance(gene, str) else "+".join(gene)
        mine = together[together["perturbation"] == name].reset_index(drop=True)
        assert mine["cell"].tolist() == alone["cell"].tolist() == adata.obs_names.tolist()
        for column in ("cosine_shift", "expression_shift", "target_shift"):
            np.testing.assert_allclose(mine[column], alone[column], atol=1e-5, rtol=1e-4)
    # one copy against the model run by hand on the tokens the definition gives
    cells = tokenize_anndata(adata, tokenizer).cells
    g20 = tokenizer.vocab.lookup(["G20"])[0]
    genes0, values0 = cells.cell(0)
    want = reference(genes0, values0, [g20], "overexpress", "binned", 11, 40)
    manual = TokenizedCells(np.array([0, len(genes0), len(genes0) + len(want[0])]),
                            np.concatenate([genes0, want[0]]).astype(np.int32),
                            np.concatenate([values0, want[1]]).astype(np.float32), np.arange(2))
    with torch.no_grad():
        emb = pair[0].backbone(**model_batch(manual, np.arange(2), tokenizer)).cell_embedding.numpy()
    shift = 1 - emb[0] @ emb[1] / np.linalg.norm(emb[0]) / np.linalg.norm(emb[1])
    got = together.query("perturbation == 'G20' and cell == 'c0'")["cosine_shift"].item()
    assert got == pytest.approx(shift, abs=1e-5) and got > 0


def test_delete_skips_cells_without_the_gene_and_counts_deleted_genes():
    adata = two_states(n_per_state=10)
    tokenizer = tokenizer_of()
    x = adata.X.toarray()
    x[:5, 0] = 0  # five cells lose G0
    adata.X = sp.csr_matrix(x)
    out = perturb_genes(adata, (tiny_model(tokenizer), tokenizer), ["G0"], mode="delete")
    assert set(out["cell"]) == set(adata.obs_names[x[:, 0] > 0]) and (out["n_expressed"] == 1).all()
    assert (out["cosine_shift"] > 0).all()


def gene_identity_only(model):
    """The model with its value embedding silenced: the embedding then says which genes a cell holds, not at what
    bins (an untrained model's embedding is dominated by its bin histogram, the same vectors in every cell)."""
    values = model.backbone.embeddings.values
    with torch.no_grad():
        values[1].weight.zero_()  # the LayerNorm after the bin embedding: its output becomes 0
    return model


@pytest.mark.parametrize(("kind", "mode"), [("rank", "overexpress"), ("rank", "delete"), ("binned", "delete"),
                                            ("binned", "overexpress")])
def test_program_moves_cells_toward_the_state_that_expresses_it(kind, mode):
    """Over-expressing the planted program in A cells moves them toward B's centroid more than random gene sets of
    the same size; deleting it from B cells moves them away from B more. A wrong perturbation (wrong genes, the set
    not inserted, or trimmed away) fails this. The model is untrained: its embedding only pools the tokens it gets.
    (Binned over-expression is checked on gene identity; its top bin is checked token by token above.)"""
    adata = two_states()
    tokenizer = tokenizer_of(kind)
    model = tiny_model(tokenizer, seed=1)
    if kind == "binned" and mode == "overexpress":
        model = gene_identity_only(model)
    rng = np.random.default_rng(0)
    random_sets = {f"random{i}": list(rng.choice(GENES[6:], len(PROGRAM), replace=False)) for i in range(8)}
    sets = {"program": PROGRAM, **random_sets}
    cells = "state=A" if mode == "overexpress" else "state=B"
    ranked = rank_genes_by_effect(perturb_genes(adata, (model, tokenizer), sets, mode=mode, cells=cells,
                                                target="state=B")).set_index("perturbation")
    program, random = ranked.loc["program"], ranked.drop("program")["target_shift"]
    if mode == "overexpress":
        assert ranked.index[0] == "program" and program["direction"] == "toward"
        assert program["target_shift"] > 2 * random.max() and program["fraction_toward"] >= 0.8
    else:
        assert ranked.index[-1] == "program" and program["direction"] == "away"
        assert program["target_shift"] < 2 * random.mean() and program["fraction_toward"] <= 0.1


def test_rank_genes_by_effect_orders_and_summarises():
    results = pd.DataFrame({"perturbation": ["a", "a", "b", "b", "c"], "cell": list("xyxyx"),
                            "cosine_shift": [0.1, 0.3, 0.05, 0.05, 0.5], "target_shift": [0.2, -0.1, -0.3, -0.1, 0.01]})
    ranked = rank_genes_by_effect(results)
    assert ranked["perturbation"].tolist() == ["a", "c", "b"]
    assert ranked["direction"].tolist() == ["toward", "toward", "away"]
    assert ranked["fraction_toward"].tolist() == [0.5, 1.0, 0.0]
    assert rank_genes_by_effect(results, by="cosine_shift", min_cells=2)["perturbation"].tolist() == ["a", "b"]


def test_bad_inputs_are_refused_with_the_fix():
    adata = two_states(n_per_state=4)
    tokenizer = tokenizer_of()
    pair = (tiny_model(tokenizer), tokenizer)
    with pytest.raises(InputError, match="NOPE"):
        perturb_genes(adata, pair, ["G1", "NOPE"])
    with pytest.raises(InputError, match="obs_key=value"):
        perturb_genes(adata, pair, ["G1"], target="B")
    with pytest.raises(InputError, match="matches no cell"):
        perturb_genes(adata, pair, ["G1"], cells="state=C")
    with pytest.raises(InputError, match="mode"):
        perturb_genes(adata, pair, ["G1"], mode="knockdown")
