"""Lose nothing, explain every refusal (issue 13, items 4-9): model folders, training checkpoints and
corpus shards that are damaged, tampered with or foreign are refused with one line naming the file
and the fix, before anything reads them wrongly.

- 4: manifest entries must be regular files inside the model folder: no ``..``, absolute paths,
  symlinks leaving it, devices or fifos, on load and in ``hub push`` (dry run too);
- 5: a folder without ``atlasformer.json`` is refused (``verify=False`` loads it with a warning), and a
  malformed manifest is named;
- 6: a damaged file of a training checkpoint is found before use and ``--resume`` falls back to the
  previous complete checkpoint, saying so; a corrupt ``model.safetensors`` is a CheckpointError;
- 7: resuming with other data or another model shape names the mismatch;
- 8: damaged corpus shards are named (with how to rebuild) before their tokens reach the model;
- 9: refused pickles get atlasformer's message (how to convert safely), never torch's advice to turn
  the check off, through one helper that every ``torch.load`` goes through.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_hub import tiny_folder
from test_safety import RunsCode

import atlasformer
from atlasformer.checkpoints import CheckpointError, load_model, push_model_folder, sha256, write_manifest
from atlasformer.cli import main
from atlasformer.pretrain.checkpoint import latest_checkpoint
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

REPO = Path(__file__).resolve().parents[1]
TORCH_ADVICE = ("weights_only=False", "Re-running", "weights_only` set to `False")


@pytest.fixture
def folder(tmp_path, sim_adata):
    return tiny_folder(tmp_path / "model", list(sim_adata.var_names))


def add_manifest_entries(folder: Path, entries: dict[str, str]) -> None:
    manifest = json.loads((folder / "atlasformer.json").read_text())
    manifest["files"].update(entries)
    (folder / "atlasformer.json").write_text(json.dumps(manifest))


def flip_bytes(path: Path, start: int, stop: int) -> None:
    data = bytearray(path.read_bytes())
    for i in range(start, min(stop, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def error_line(capsys) -> str:
    """The CLI's last stderr line, which must be its one-line ``error: ...`` message."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), lines[-5:]
    return lines[-1]


# ---------------------------------------------------------------- 4: manifest entries stay in the folder
@pytest.mark.parametrize("entry", ["../outside.txt", "ABSOLUTE", "sub/../../outside.txt"])
def test_manifest_entries_outside_the_folder_are_refused_even_with_the_right_hash(folder, tmp_path, entry):
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the model")
    name = str(outside) if entry == "ABSOLUTE" else entry
    add_manifest_entries(folder, {name: sha256(outside)})
    with pytest.raises(CheckpointError, match=re.escape(repr(name)) + ".*only regular files inside the model folder"):
        load_model(folder)


@pytest.mark.timeout(60)  # the old loader hashed /dev/zero and fifos forever
def test_devices_and_fifos_are_refused_without_being_read(folder):
    manifest = json.loads((folder / "atlasformer.json").read_text())
    os.mkfifo(folder / "pipe")
    (folder / "zero").symlink_to("/dev/zero")
    for name, problem in [("/dev/zero", "is an absolute path"), ("pipe", "is not a regular file \\(a device, fifo"),
                          ("zero", "is a symlink to /dev/zero, outside the folder")]:
        (folder / "atlasformer.json").write_text(json.dumps({**manifest, "files": {**manifest["files"], name: "0" * 64}}))
        with pytest.raises(CheckpointError, match=f"'{name}' in atlasformer.json {problem}"):
            load_model(folder)


def test_a_symlink_leaving_the_folder_is_neither_loaded_nor_pushed(folder, tmp_path, capsys):
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY-----")
    (folder / "notes.txt").symlink_to(secret)
    write_manifest(folder, {})  # a manifest written over the link lists it with its target's hash
    expected = "'notes.txt'.*symlink to .*id_rsa, outside the folder"
    with pytest.raises(CheckpointError, match=expected):
        push_model_folder(folder, "atlas-org/tiny", dry_run=True)
    with pytest.raises(CheckpointError, match=expected):
        atlasformer.from_pretrained(folder)
    assert main(["hub", "push", str(folder), "atlas-org/tiny", "--dry-run"]) == 2
    assert re.search(expected, error_line(capsys))


# ---------------------------------------------------------------- 5: no manifest, malformed manifest
def test_a_folder_without_manifest_is_refused_unless_verify_false(folder):
    (folder / "atlasformer.json").unlink()
    with pytest.raises(CheckpointError, match="has no atlasformer.json.*cannot be verified.*re-export or re-download"):
        atlasformer.from_pretrained(folder)
    with pytest.warns(UserWarning, match="no atlasformer.json; loading unverified"):
        model, _ = atlasformer.from_pretrained(folder, verify=False)
    assert model.config.d_model == 16


def test_a_malformed_manifest_names_the_file(folder, sim_h5ad, tmp_path, capsys):
    (folder / "atlasformer.json").write_text('{"format_version": 1, "files": ')
    expected = r"atlasformer.json is not valid JSON \(.*\); re-export or re-download the model"
    with pytest.raises(CheckpointError, match=expected):
        load_model(folder)
    assert main(["embed", "--data", str(sim_h5ad), "--model", str(folder), "--output", str(tmp_path / "out")]) == 2
    assert re.search(str(folder / "atlasformer.json") + " is not valid JSON", error_line(capsys))


# ---------------------------------------------------------------- 6, 7: training checkpoints
def pretrain_args(data: Path, run: Path, *extra: str, d_model: int = 32) -> list[str]:
    """A tiny run (2 layers, width ``d_model``) saving every 2 steps; ``extra`` overrides come last."""
    return ["pretrain", "--data", str(data), "--output", str(run), f"model.d_model={d_model}", "model.n_layers=2",
            "model.n_heads=2", "model.dropout=0.0", "batch_size=8", "warmup_steps=1", "eval_every=2", "eval_batches=1",
            "save_every=2", "keep_last=2", "log_every=1", "threads=1", "max_steps=4", *extra]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, sim_adata):
    """A 4-step tiny run on the simulated data with complete checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("run")
    sim_adata.write_h5ad(root / "sim.h5ad")
    assert main(pretrain_args(root / "sim.h5ad", root / "run")) == 0
    return root / "sim.h5ad", root / "run"


@pytest.fixture
def run_copy(trained_run, tmp_path):
    data, run = trained_run
    shutil.copytree(run, tmp_path / "run")
    return data, tmp_path / "run"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_middle(path: Path) -> None:
    size = path.stat().st_size
    flip_bytes(path, size // 2, size // 2 + 4)


@pytest.mark.parametrize("name, damage", [("model.safetensors", flip_middle), ("optimizer.pt", truncate),
                                          ("scheduler.pt", flip_middle), ("trainer_state.json", truncate),
                                          ("rng_rank0.safetensors", flip_middle), ("config.json", flip_middle)])
def test_a_damaged_checkpoint_file_falls_back_to_the_previous_checkpoint(run_copy, name, damage):
    _, run = run_copy
    damage(run / "checkpoints" / "step-4" / name)
    lines = []
    assert latest_checkpoint(run, verify=True, log=lines.append) == run / "checkpoints" / "step-2"
    assert len(lines) == 1 and re.search(rf"step-4 is damaged \({re.escape(name)} .*falling back", lines[0]), lines


def test_resume_past_a_damaged_checkpoint_continues_from_the_previous_one(run_copy, capsys):
    data, run = run_copy
    truncate(run / "checkpoints" / "step-4" / "optimizer.pt")
    assert main(pretrain_args(data, run, "max_steps=6", "--resume")) == 0
    out = capsys.readouterr().err  # progress and warnings are log lines, on stderr
    assert re.search(r"step-4 is damaged \(optimizer.pt has \d+ bytes, \d+ were written", out), out[-2000:]
    assert re.search(r"resumed from \S*step-2 at step 2", out), out[-2000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6 and sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4", "step-6"]


def test_every_checkpoint_damaged_is_a_clear_error(run_copy):
    _, run = run_copy
    for step in (2, 4):
        flip_middle(run / "checkpoints" / f"step-{step}" / "model.safetensors")
    with pytest.raises(CheckpointError, match="every complete checkpoint is damaged.*start a new --output"):
        latest_checkpoint(run, verify=True, log=lambda _: None)


def test_corrupt_weights_under_a_matching_manifest_are_a_checkpoint_error(folder):
    truncate(folder / "model.safetensors")
    write_manifest(folder, {})  # the manifest was written over the bad file: its hash matches
    with pytest.raises(CheckpointError, match="model.safetensors: cannot be read as safetensors.*truncated or corrupt"):
        load_model(folder)


def test_resume_with_other_data_names_the_vocabulary_mismatch(run_copy, tmp_path, capsys):
    data, run = run_copy
    other = simulate_counts(n_cells=600, n_genes=250, n_cell_types=4, n_batches=2, seed=5)
    other.write_h5ad(tmp_path / "other.h5ad")
    assert main(pretrain_args(tmp_path / "other.h5ad", run, "max_steps=6", "--resume")) == 2
    line = error_line(capsys)
    assert re.search(r"checkpoint step-4 was trained with a vocabulary of \d+ tokens; this run builds a vocabulary of \d+ tokens: "
                     "resume with the same --data and config, or start a new --output", line), line


def test_resume_with_another_model_shape_names_it(run_copy, capsys):
    data, run = run_copy
    assert main(pretrain_args(data, run, "max_steps=6", "--resume", d_model=16)) == 2
    line = error_line(capsys)
    assert "checkpoint step-4 was trained with d_model 32 / d_ff 128; this run builds d_model 16 / d_ff 64" in line, line


# ---------------------------------------------------------------- 8: damaged corpus shards
@pytest.fixture(scope="module")
def built_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    adata = simulate_counts(n_cells=300, n_genes=120, n_cell_types=3, n_batches=2, seed=0)
    adata.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    adata.write_h5ad(root / "sim.h5ad")
    build_corpus([root / "sim.h5ad"], root / "corpus", config=CorpusConfig(
        tokenizer=TokenizerConfig(max_seq_len=64), batch_key="batch", shard_size=100, chunk_size=50), log=lambda _: None)
    return root / "corpus"


@pytest.fixture
def corpus_copy(built_corpus, tmp_path):
    return Path(shutil.copytree(built_corpus, tmp_path / "corpus"))


def read_one_epoch(corpus: Path) -> None:
    loader = CorpusLoader(Corpus(corpus), 8, config=LoaderConfig(block_size=20, buffer_size=40),
                          condition_keys=("batch",))
    for _ in range(300 // 8):
        loader.next_batch()


@pytest.mark.parametrize("name, start, problem", [
    ("gene_ids.npy", 200, "gene id .* outside the vocabulary"),
    ("values.npy", 200, "value bin .* outside the 51 bins"),
    ("offsets.npy", 200, "offsets.npy does not run from 0"),
    ("obs.parquet", -4, "obs.parquet is unreadable"),
])
def test_a_shard_with_flipped_bytes_is_named_before_it_reaches_the_model(corpus_copy, name, start, problem):
    path = corpus_copy / "shard-00001" / name
    flip_bytes(path, start % path.stat().st_size, start % path.stat().st_size + 40)
    with pytest.raises(InputError, match=rf"shard-00001: corpus shard is damaged \({problem}.*rebuild it: "
                                         r"rerun the same `atlasformer tokenize` command"):
        read_one_epoch(corpus_copy)


def test_pretraining_from_a_damaged_corpus_stops_with_the_shard_named(corpus_copy, tmp_path, capsys):
    genes = corpus_copy / "shard-00002" / "gene_ids.npy"
    flip_bytes(genes, 128, genes.stat().st_size)  # every token after the .npy header: whichever block is read first
    args = ["pretrain", "--data", str(corpus_copy), "--output", str(tmp_path / "run"), "model=tiny", "batch_size=8",
            "warmup_steps=1", "eval_batches=1", "save_every=100", "loader.block_size=20", "loader.buffer_size=40",
            "loader.num_workers=1", "threads=1", "max_steps=30"]
    assert main(args) == 2
    line = error_line(capsys)
    assert re.search(r"shard-00002: corpus shard is damaged \(gene id \d+ outside the vocabulary", line), line


# ---------------------------------------------------------------- 9: refused pickles, one helper
def assert_atlasformer_refusal(message: str, marker: Path) -> None:
    assert "system" in message and "could run code" in message and "safetensors.torch.save_file" in message
    assert not any(advice in message for advice in TORCH_ADVICE), message
    assert len(message.splitlines()) == 1 and not marker.exists()


def test_the_shared_loader_refuses_code_with_its_own_message(tmp_path):
    from atlasformer.checkpoints import load_weights_only

    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(2), "payload": RunsCode(marker)}, tmp_path / "optimizer.pt")
    with pytest.raises(CheckpointError) as err:
        load_weights_only(tmp_path / "optimizer.pt")
    assert_atlasformer_refusal(str(err.value), marker)
    torch.save({"weight": torch.ones(2)}, tmp_path / "plain.pt")  # tensors and plain containers load as before
    assert torch.equal(load_weights_only(tmp_path / "plain.pt")["weight"], torch.ones(2))


def test_geneformer_pytorch_model_bin_that_runs_code_gets_the_same_message(tmp_path):
    from atlasformer.checkpoints.geneformer import load_bert_state_dict

    marker = tmp_path / "pwned"
    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(4, 8), "x": RunsCode(marker)},
               tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        load_bert_state_dict(tmp_path)
    assert_atlasformer_refusal(str(err.value), marker)


def test_every_torch_load_goes_through_the_shared_helper():
    offenders = []
    for package in ("atlasformer", "tokenization", "model_zoo", "checkpoints", "pretrain", "finetune", "analysis", "scripts",
                    "benchmarks"):
        for path in (REPO / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            helper = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "load_weights_only"
                      for n in ast.walk(f)}
            for node in ast.walk(tree):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch" and id(node) not in helper):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders
