"""Streaming a corpus: disjoint shares across ranks and workers, exact resumption, refused world-size
change, length grouping, held-out blocks, conditions, and pretraining from a corpus folder."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from atlasformer.cli import main as cli_main
from atlasformer.tokenization import (
    Corpus,
    CorpusConfig,
    CorpusLoader,
    InputError,
    LoaderConfig,
    TokenizerConfig,
    build_corpus,
    simulate_counts,
)

N_CELLS = 640  # 4 shards x 160 cells = 40 blocks of 16: every reader's buffers divide into batches of 8
SMALL = dict(block_size=16, buffer_size=64)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    adata = simulate_counts(n_cells=N_CELLS, n_genes=200, n_cell_types=3, n_batches=3, mean_library=1500, seed=0)
    adata.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    adata.write_h5ad(root / "sim.h5ad")
    build_corpus([root / "sim.h5ad"], root / "corpus", config=CorpusConfig(
        tokenizer=TokenizerConfig(max_seq_len=150), batch_key="batch", shard_size=160, chunk_size=80), log=lambda _: None)
    return root / "corpus"


def loader(corpus_dir, *, batch_size=8, rank=0, world_size=1, **config):
    return CorpusLoader(Corpus(corpus_dir), batch_size, seed=3, rank=rank, world_size=world_size,
                        config=LoaderConfig(**{**SMALL, **config}), condition_keys=("batch",))


def cell_ids(load, n):
    return [load.next_batch()["cell_ids"].numpy() for _ in range(n)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_and_workers_read_disjoint_shares_covering_every_cell(corpus_dir, num_workers):
    world_size = 2
    per_rank = N_CELLS // world_size // 8  # batches per rank in one epoch
    shares = []
    for rank in range(world_size):
        load = loader(corpus_dir, rank=rank, world_size=world_size, num_workers=num_workers)
        batches = cell_ids(load, per_rank)
        shares.append(np.concatenate(batches))
        load.close()
    union = np.concatenate(shares)
    assert len(union) == len(np.unique(union)) == N_CELLS  # no overlap, every cell once
    assert not set(shares[0]) & set(shares[1])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resuming_continues_with_exactly_the_same_batches(corpus_dir, num_workers):
    reference = cell_ids(loader(corpus_dir, num_workers=num_workers), 110)  # crosses an epoch (80 batches)
    first = loader(corpus_dir, num_workers=num_workers)
    head = cell_ids(first, 37)
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    first.close()
    resumed = loader(corpus_dir, num_workers=num_workers)
    resumed.load_state_dict(state)
    tail = cell_ids(resumed, 110 - 37)
    for got, want in zip(head + tail, reference):
        np.testing.assert_array_equal(got, want)
    # the next epoch is another permutation of the same cells
    assert sorted(np.concatenate(reference[:80])) == list(range(N_CELLS))
    assert not all((a == b).all() for a, b in zip(reference[80:110], reference[:30]))


def test_resuming_with_another_world_size_or_loader_is_refused(corpus_dir):
    two = loader(corpus_dir, rank=0, world_size=2)
    cell_ids(two, 3)
    state = two.state_dict()
    with pytest.raises(InputError, match="2 process.*this run has 1.*same number of processes"):
        loader(corpus_dir).load_state_dict(state)
    with pytest.raises(InputError, match="batch_size=8"):
        loader(corpus_dir, batch_size=16, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(InputError, match="in-memory"):
        loader(corpus_dir).load_state_dict({"epoch": 0, "step": 3, "world_size": 1, "seed": 0, "n_cells": 10})


def test_length_grouping_reduces_padding_and_is_reported(corpus_dir):
    grouped, plain = loader(corpus_dir), loader(corpus_dir, length_grouping=False)
    cell_ids(grouped, 80)
    cell_ids(plain, 80)
    assert 0 <= grouped.padded_fraction < plain.padded_fraction < 1
    assert grouped.padded_fraction < 0.5 * plain.padded_fraction
    batch = grouped.next_batch()
    real = batch["attention_mask"].sum()
    assert real == (batch["input_ids"] != Corpus(corpus_dir).tokenizer.vocab.pad_id).sum()


def test_held_out_blocks_never_reach_training_and_conditions_match_obs(corpus_dir):
    corpus = Corpus(corpus_dir)
    load = CorpusLoader(corpus, 8, seed=0, config=LoaderConfig(**SMALL), eval_fraction=0.1, condition_keys=("batch",))
    held = {int(c) for s, a, b in load.eval_blocks for c in range(corpus.shard_starts[s] + a, corpus.shard_starts[s] + b)}
    assert len(held) == 4 * 16 and load.n_train_cells == N_CELLS - 64
    eval_cells, _, _ = load.eval_cells(40)
    assert len(eval_cells) == 40 and set(eval_cells.cell_index) <= held
    batch_of_cell = {}
    for shard in range(len(corpus.shards)):
        obs = corpus.obs(shard)
        batch_of_cell.update(zip(range(corpus.shard_starts[shard], corpus.shard_starts[shard + 1]), obs["batch"]))
    seen = set()
    for _ in range(len(corpus.shards) * 10):
        batch = load.next_batch()
        ids = batch["cell_ids"].numpy()
        seen.update(ids.tolist())
        names = [load.condition_names[c] for c in batch["conditions"].numpy()]
        assert names == [batch_of_cell[i] for i in ids]
    assert not seen & held


def test_pretrain_from_a_corpus_folder_runs_and_resumes_exactly(corpus_dir, tmp_path):
    run = tmp_path / "run"
    args = ["pretrain", "--data", str(corpus_dir), "--output", str(run), "--batch-key", "batch", "model=tiny",
            "batch_size=8", "warmup_steps=1", "eval_every=2", "eval_batches=2", "save_every=2", "log_every=1",
            "loader.block_size=16", "loader.buffer_size=64", "threads=1", "max_steps=4"]
    assert cli_main(args) == 0
    state = json.loads((run / "checkpoints" / "step-2" / "trainer_state.json").read_text())["data"][0]
    assert state["kind"] == "corpus" and state["readers"] == [{"epoch": 0, "buffer": 0, "batch": 2}]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows if "train/loss" in r} == {1, 2, 3, 4}
    assert all(0 <= r["padded_fraction"] < 1 for r in rows if "train/loss" in r)
    assert (run / "model" / "vocab.json").read_text() == (corpus_dir / "vocab.json").read_text()
    # a run stopped after step 2 and resumed trains on the same batches: identical losses and weights
    stopped = tmp_path / "stopped"
    shutil.copytree(run, stopped)
    shutil.rmtree(stopped / "checkpoints" / "step-4")
    shutil.rmtree(stopped / "model")
    (stopped / "metrics.jsonl").write_text("".join(line + "\n" for line in (run / "metrics.jsonl").read_text().splitlines()
                                                  if json.loads(line)["step"] <= 2))
    assert cli_main([*[str(stopped) if a == str(run) else a for a in args], "--resume"]) == 0
    resumed = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("train/loss") for r in resumed if r["step"] > 2] == [r.get("train/loss") for r in rows if r["step"] > 2]
    weights, reference = (load_file(str(d / "model" / "model.safetensors")) for d in (stopped, run))
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


@pytest.mark.distributed
def test_two_processes_stream_disjoint_shares_and_resuming_with_one_is_refused(corpus_dir, tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    args = ["--data", str(corpus_dir), "--output", str(run), "model=tiny", "batch_size=8", "warmup_steps=1",
            "eval_batches=1", "save_every=3", "log_every=1", "loader.block_size=16", "loader.buffer_size=64",
            "threads=1", "max_steps=3"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                    "-m", "atlasformer.cli", "pretrain", *args], check=True, cwd=tmp_path, timeout=600,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    states = json.loads((run / "checkpoints" / "step-3" / "trainer_state.json").read_text())["data"]
    assert [s["world_size"] for s in states] == [2, 2]
    assert [s["readers"] for s in states] == [[{"epoch": 0, "buffer": 0, "batch": 3}]] * 2
    assert cli_main(["pretrain", *args[:-1], "max_steps=5", "--resume"]) == 2
    assert "written by 2 process(es), this run has 1" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["batch", "source"])
def test_domains_of_the_batch_adversary_match_obs_or_the_input_file(corpus_dir, key):
    corpus = Corpus(corpus_dir)
    load = CorpusLoader(corpus, 8, seed=0, config=LoaderConfig(**SMALL), eval_fraction=0.1, domain_key=key)
    expected = sorted({f"batch_{i}" for i in range(3)}) if key == "batch" else ["sim"]
    assert load.domain_names == expected
    truth = {}
    for shard in range(len(corpus.shards)):
        obs = corpus.obs(shard)
        names = obs["batch"].astype(str) if key == "batch" else obs["source"].map(lambda i: corpus.source_names()[i])
        truth.update(zip(range(corpus.shard_starts[shard], corpus.shard_starts[shard + 1]), names))
    for _ in range(5):
        batch = load.next_batch()
        assert "conditions" not in batch
        assert [load.domain_names[d] for d in batch["domains"].numpy()] == [truth[i] for i in batch["cell_ids"].numpy()]
    cells, _, domains = load.eval_cells(40)
    assert [load.domain_names[d] for d in domains] == [truth[i] for i in cells.cell_index]


def test_pretrain_from_a_corpus_with_a_batch_adversary(corpus_dir, tmp_path):
    run = tmp_path / "run"
    assert cli_main(["pretrain", "--data", str(corpus_dir), "--output", str(run), "model=tiny", "batch_size=8",
                     "warmup_steps=1", "eval_every=2", "eval_batches=2", "log_every=1", "loader.block_size=16",
                     "loader.buffer_size=64", "threads=1", "max_steps=2", "adversary_key=batch",
                     "objectives={masked_value: 1.0, batch_adversary: 0.1}"]) == 0
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["domain_names"] == ["batch_0", "batch_1", "batch_2"] and config["n_conditions"] == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/batch_adversary" in r for r in rows) and any("eval/domain_accuracy" in r for r in rows)
