"""Pretraining on real data lowers the held-out masked-value loss; the run folder is complete."""

import json

import pytest

from atlasformer.checkpoints import load_model_folder
from atlasformer.model_zoo import CellTransformerForPretraining
from atlasformer.pretrain import PretrainConfig, latest_checkpoint, train
from atlasformer.tokenization import InputError, TokenizerConfig


def eval_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval/masked_value"] for r in rows if "eval/masked_value" in r}


@pytest.mark.shared_data
def test_pretraining_on_pbmc4k_lowers_heldout_loss(tmp_path, shared_data):
    cfg = PretrainConfig(
        data=(str(shared_data("pbmc4k_10x_v2.h5ad")),), output=str(tmp_path / "run"),
        model={"d_model": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.0},
        tokenizer=TokenizerConfig(max_seq_len=128, n_bins=21), max_steps=200, batch_size=16, lr=2e-3,
        warmup_steps=20, eval_every=100, eval_batches=8, eval_fraction=0.1, save_every=100, log_every=50, seed=0)
    model_dir = train(cfg)
    losses = eval_losses(tmp_path / "run")
    assert set(losses) == {0, 100, 200}
    # clearly lower: at least 15% below the untrained model's held-out loss
    assert losses[200] < 0.85 * losses[0], losses
    model, tokenizer = load_model_folder(model_dir)
    assert isinstance(model, CellTransformerForPretraining) and tokenizer.config.n_bins == 21
    assert latest_checkpoint(tmp_path / "run").name == "step-200"
    assert len(list((tmp_path / "run" / "checkpoints").glob("step-*"))) == cfg.keep_last


def test_refuses_to_overwrite_a_run_without_resume(tmp_path, sim_h5ad):
    cfg = PretrainConfig(data=(str(sim_h5ad),), output=str(tmp_path / "run"), model={"d_model": 32, "n_layers": 1, "n_heads": 2},
                         tokenizer=TokenizerConfig(max_seq_len=64), max_steps=4, batch_size=8, eval_every=4,
                         save_every=4, warmup_steps=1)
    train(cfg)
    with pytest.raises(InputError, match="--resume"):
        train(cfg)
    # resuming a finished run is a no-op that re-exports the model
    assert (train(cfg, resume=True) / "model.safetensors").exists()


@pytest.mark.parametrize("mode", ["resolve", "raw"])
def test_pretraining_vocabulary_follows_gene_id_mode(mode, sim_adata):
    from atlasformer.pretrain.train import make_tokenizer

    adata = sim_adata[:, :20].copy()
    adata.var_names = ["TP53", "CD8A", "MS4A1"] + [f"ENSG{i:011d}.3" for i in range(17)]
    cfg = PretrainConfig(data=("unused.h5ad",), output="unused", tokenizer=TokenizerConfig(gene_id_mode=mode))
    vocab = make_tokenizer(cfg, [("mem.h5ad", adata)]).vocab
    # resolving strips version suffixes and maps symbols to Ensembl IDs; raw keeps the names as given
    assert ("ENSG00000000001.3" in vocab) == (mode == "raw")
    assert ("TP53" in vocab) == (mode == "raw")


def test_pretraining_vocabulary_can_keep_only_genes_that_are_tokens(sim_adata):
    from atlasformer.pretrain.train import make_tokenizer

    def vocab(**kw):
        cfg = PretrainConfig(data=("unused.h5ad",), output="unused", **kw,
                             tokenizer=TokenizerConfig(gene_id_mode="raw", max_seq_len=16))
        return make_tokenizer(cfg, [("mem.h5ad", sim_adata)]).vocab

    every, tokens = vocab(vocab_min_cells=1), vocab(vocab_min_cells=1, vocab_min_token_cells=1)
    assert set(tokens.genes) < set(every.genes)  # 16 genes per cell leave some expressed genes out
    assert len(tokens.genes) > 16


def test_batch_adversary_objective_and_its_domains_go_together():
    with pytest.raises(ValueError, match="adversary_key"):
        PretrainConfig(objectives={"masked_value": 1.0, "batch_adversary": 0.1})
    with pytest.raises(ValueError, match="batch_adversary objective and adversary_key go together"):
        PretrainConfig(adversary_key="batch")
    with pytest.raises(ValueError, match="trains nothing to keep"):
        PretrainConfig(adversary_key="batch", objectives={"batch_adversary": 1.0})


def test_batch_adversary_reverses_the_gradient_the_encoder_gets():
    """The discriminator learns to name the domain; the encoder gets exactly the opposite gradient (scGPT's DAB)."""
    import torch
    import torch.nn.functional as F

    from atlasformer.model_zoo import CellTransformerConfig

    config = CellTransformerConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2, dropout=0.0,
                                   domain_names=["a", "b", "c"])
    model = CellTransformerForPretraining(config)
    inputs = dict(input_ids=torch.randint(3, 20, (6, 8)), values=torch.randint(0, 51, (6, 8)).float(),
                  attention_mask=torch.ones(6, 8, dtype=torch.bool))
    domains = torch.tensor([0, 1, 2, 0, 1, 2])
    out = model(**inputs, target_mask=torch.zeros(6, 8, dtype=torch.bool), domains=domains,
                objective_weights={"batch_adversary": 0.5})
    assert set(out.loss_terms) == {"batch_adversary"}
    out.loss.backward()
    reversed_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    plain = 0.5 * F.cross_entropy(model.domain_head(model.backbone(**inputs).cell_embedding), domains)
    plain.backward()
    assert torch.allclose(plain, out.loss)
    for name, p in model.named_parameters():
        if p.grad is None or not p.grad.abs().sum():
            continue
        sign = 1.0 if name.startswith("domain_head") else -1.0
        assert torch.allclose(reversed_grads[name], sign * p.grad, atol=1e-6), name
    # a cell without a domain (-1) is left out of the mean
    partial = torch.tensor([0, -1, 2, -1, 1, 2])
    out = model(**inputs, target_mask=torch.zeros(6, 8, dtype=torch.bool), domains=partial,
                objective_weights={"batch_adversary": 1.0})
    logits = model.domain_head(model.backbone(**inputs).cell_embedding)
    assert torch.allclose(out.loss, F.cross_entropy(logits[partial >= 0], partial[partial >= 0]))
    linear = CellTransformerForPretraining(CellTransformerConfig(**{**config.to_dict(), "domain_hidden_layers": 0}))
    assert len(linear.domain_head.hidden) == 0 and linear.domain_head.out.in_features == 16


def test_pretraining_with_a_batch_adversary_on_the_input_files(tmp_path, sim_adata):
    paths = []
    for name, cells in [("first.h5ad", slice(0, 300)), ("second.h5ad", slice(300, 600))]:
        paths.append(tmp_path / name)
        sim_adata[cells].copy().write_h5ad(paths[-1])
    cfg = PretrainConfig(data=tuple(map(str, paths)), output=str(tmp_path / "run"),
                         model={"d_model": 32, "n_layers": 1, "n_heads": 2}, tokenizer=TokenizerConfig(max_seq_len=64),
                         max_steps=4, batch_size=8, eval_every=2, eval_batches=4, save_every=4, warmup_steps=1,
                         log_every=1, adversary_key="source", objectives={"masked_value": 1.0, "batch_adversary": 0.1})
    model_dir = train(cfg)
    model, _ = load_model_folder(model_dir)
    assert model.config.domain_names == ["first", "second"] and model.domain_head.out.out_features == 2
    assert "- batch adversary on source: 2 domains" in (model_dir / "README.md").read_text()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/batch_adversary"] > 0 for r in rows if "train/loss" in r)
    evals = [r for r in rows if "eval/loss" in r]
    assert all(0 <= r["eval/domain_accuracy"] <= 1 for r in evals)
    # the held-out loss stays the masked losses alone, comparable with a run without the adversary
    assert all(r["eval/loss"] == pytest.approx(r["eval/masked_value"]) for r in evals)
    # an obs column as the domains: the batches, and a file without the column is named
    with pytest.raises(InputError, match=r"\['nope'\] not in obs.*source for the input file"):
        train(PretrainConfig(**{**cfg.__dict__, "output": str(tmp_path / "run2"), "adversary_key": "nope"}))
    with pytest.raises(InputError, match=r"at least 2 domains; adversary_key='source' gives \['first'\]"):
        train(PretrainConfig(**{**cfg.__dict__, "data": (str(paths[0]),), "output": str(tmp_path / "run3")}))
