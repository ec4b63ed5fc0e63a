"""Model folders on the hub: manifest and card, format-version policy, loading by hub id from a local
huggingface_hub cache with HF_HUB_OFFLINE=1 (revisions, subfolders, clear errors), and `hub push`
validated up to the network call."""

import json

import anndata as ad
import pytest
import torch
from hub_cache import add_to_hub_cache, hub_cache  # noqa: F401  (fixture)
from huggingface_hub import HfApi, scan_cache_dir

import atlasformer
from atlasformer.checkpoints import (
    FORMAT_VERSION,
    CheckpointError,
    export_model_folder,
    load_model_folder,
    push_model_folder,
    read_manifest,
)
from atlasformer.cli import main
from atlasformer.model_zoo import (
    CellTransformerConfig,
    CellTransformerForAnnotation,
    CellTransformerForPretraining,
)
from atlasformer.tokenization import CellTokenizer, GeneVocab, TokenizerConfig

BENCHMARK_ROWS = [
    {"task": "annotation", "dataset": "kang", "method": "atlasformer", "metric": "macro_f1", "seed": s, "value": v}
    for s, v in enumerate([0.8, 0.9])
]


def tiny_folder(path, genes, seed=0, annotation=False):
    torch.manual_seed(seed)
    vocab = GeneVocab(genes)
    config = CellTransformerConfig(vocab_size=len(vocab), d_model=16, n_layers=1, n_heads=2, n_bins=11, dropout=0.0)
    if annotation:
        config.id2label = {0: "B cell", 1: "T cell"}
        model = CellTransformerForAnnotation(config)
    else:
        model = CellTransformerForPretraining(config)
    tokenizer = CellTokenizer(vocab, TokenizerConfig(n_bins=11, max_seq_len=64))
    return export_model_folder(model.eval(), tokenizer, path, {"data": ["sim.h5ad"], "objectives": {"masked_value": 1}},
                               benchmark=BENCHMARK_ROWS)


@pytest.fixture
def folder(tmp_path, sim_adata):
    return tiny_folder(tmp_path / "model", list(sim_adata.var_names))


def weights(model):
    return model.backbone.embeddings.genes.weight.detach().clone()


# ------------------------------------------------------------------------------------- format
def test_manifest_covers_every_file_and_card_has_every_section(folder):
    manifest = json.loads((folder / "atlasformer.json").read_text())
    files = {p.name for p in folder.iterdir()} - {"atlasformer.json"}
    assert set(manifest["files"]) == files and all(len(h) == 64 for h in manifest["files"].values())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["atlasformer_version"]
    assert manifest["run_config"]["data"] == ["sim.h5ad"]
    card = (folder / "README.md").read_text()
    for section in ("## Architecture", "parameters:", "## Tokenizer", "corpus: sim.h5ad", "objectives:",
                    "## Benchmark", "## Licence and provenance", "license: apache-2.0"):
        assert section in card, section
    assert "| annotation | kang | atlasformer | macro_f1 | 0.8500 | 0.0707 | 2 |" in card


def test_newer_format_version_fails_with_a_clear_message(folder):
    manifest = json.loads((folder / "atlasformer.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (folder / "atlasformer.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"format {FORMAT_VERSION + 1}.*reads format <= {FORMAT_VERSION}.*pip install -U"):
        atlasformer.from_pretrained(folder)


def test_tampered_weights_are_refused(folder):
    blob = bytearray((folder / "model.safetensors").read_bytes())
    blob[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="model.safetensors does not match its SHA-256"):
        atlasformer.from_pretrained(folder)


def test_task_heads_travel_in_config(tmp_path, sim_adata):
    folder = tiny_folder(tmp_path / "ann", list(sim_adata.var_names), annotation=True)
    assert json.loads((folder / "config.json").read_text())["id2label"] == {"0": "B cell", "1": "T cell"}
    model, _ = atlasformer.from_pretrained(folder)
    assert isinstance(model, CellTransformerForAnnotation) and model.config.id2label[1] == "T cell"


# ------------------------------------------------------------------------------- loading by id
def test_hub_id_loads_offline_from_the_cache_with_revisions(tmp_path, hub_cache, sim_adata):  # noqa: F811
    genes = list(sim_adata.var_names)
    old = tiny_folder(tmp_path / "v1", genes, seed=1)
    new = tiny_folder(tmp_path / "v2", genes, seed=2)
    old_commit = add_to_hub_cache(hub_cache, "atlas-org/tiny", old, revision="v1")
    add_to_hub_cache(hub_cache, "atlas-org/tiny", new, revision="main")
    info = scan_cache_dir(hub_cache)  # huggingface_hub accepts the layout as its own
    assert not info.warnings and {r.repo_id for r in info.repos} == {"atlas-org/tiny"}

    latest, tokenizer = atlasformer.from_pretrained("atlas-org/tiny")
    tagged, _ = atlasformer.from_pretrained("atlas-org/tiny", revision="v1")
    pinned, _ = atlasformer.from_pretrained("atlas-org/tiny", revision=old_commit)
    assert torch.equal(weights(latest), weights(load_model_folder(new)[0]))
    assert torch.equal(weights(tagged), weights(load_model_folder(old)[0]))
    assert torch.equal(weights(pinned), weights(tagged)) and not torch.equal(weights(tagged), weights(latest))
    assert tokenizer.vocab.genes == genes


def test_subfolder_of_a_repository(tmp_path, hub_cache, sim_adata):  # noqa: F811
    folder = tiny_folder(tmp_path / "m", list(sim_adata.var_names))
    add_to_hub_cache(hub_cache, "atlas-org/zoo", folder, prefix="models/small")
    model, _ = atlasformer.from_pretrained("atlas-org/zoo", subfolder="models/small")
    assert torch.equal(weights(model), weights(load_model_folder(folder)[0]))
    with pytest.raises(CheckpointError, match="no subfolder 'models/large'.*small"):
        atlasformer.from_pretrained("atlas-org/zoo", subfolder="models/large")


def test_fine_tuned_model_annotates_by_hub_id(tmp_path, hub_cache, sim_adata):  # noqa: F811
    add_to_hub_cache(hub_cache, "atlas-org/tiny-annotator", tiny_folder(tmp_path / "a", list(sim_adata.var_names),
                                                                         annotation=True))
    annotated = atlasformer.annotate(sim_adata[:50].copy(), "atlas-org/tiny-annotator", copy=True)
    assert set(annotated.obs["atlasformer_label"]) <= {"B cell", "T cell", "unknown"}


def test_offline_and_not_cached_names_the_id_and_the_fetch_command(hub_cache):  # noqa: F811
    with pytest.raises(CheckpointError, match=r"atlas-org/absent.*HF_HUB_OFFLINE=1.*hf download atlas-org/absent --revision v2"):
        atlasformer.from_pretrained("atlas-org/absent", revision="v2")
    with pytest.raises(CheckpointError, match="not a hub id"):
        atlasformer.from_pretrained("no/such/folder/here")


def test_partly_cached_snapshot_is_reported(tmp_path, hub_cache, sim_adata):  # noqa: F811
    commit = add_to_hub_cache(hub_cache, "atlas-org/tiny", tiny_folder(tmp_path / "m", list(sim_adata.var_names)))
    (hub_cache / "models--atlas-org--tiny" / "snapshots" / commit / "model.safetensors").unlink()  # interrupted download
    with pytest.raises(CheckpointError, match="atlas-org/tiny: only partly in the local Hugging Face cache.*hf download"):
        atlasformer.from_pretrained("atlas-org/tiny")


def test_cli_model_flag_takes_a_hub_id(tmp_path, hub_cache, sim_adata, sim_h5ad):  # noqa: F811
    add_to_hub_cache(hub_cache, "atlas-org/tiny", tiny_folder(tmp_path / "m", list(sim_adata.var_names)))
    assert main(["embed", "--data", str(sim_h5ad), "--model", "atlas-org/tiny", "--output", str(tmp_path / "out")]) == 0
    emb = ad.read_h5ad(tmp_path / "out" / "sim.h5ad").obsm["X_atlasformer"]
    assert emb.shape == (sim_adata.n_obs, 16)
    assert main(["embed", "--data", str(sim_h5ad), "--model", "atlas-org/missing", "--output", str(tmp_path / "o2")]) == 2


# ------------------------------------------------------------------------------------------ push
@pytest.fixture
def fake_hub(monkeypatch):
    """Record HfApi.create_repo / upload_folder calls instead of making them."""
    calls = []
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))

    def upload_folder(self, **kw):
        calls.append(("upload_folder", kw["repo_id"], kw))
        return type("Commit", (), {"commit_url": f"https://hub.example/{kw['repo_id']}/commit/1"})()

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_uploads_exactly_the_validated_folder(folder, fake_hub):
    plan = push_model_folder(folder, "atlas-org/tiny", private=True)
    manifest = read_manifest(folder)
    (create, repo, create_kw), (upload, _, upload_kw) = fake_hub
    assert (create, repo, create_kw["private"], create_kw["exist_ok"]) == ("create_repo", "atlas-org/tiny", True, True)
    assert upload == "upload_folder" and upload_kw["folder_path"] == str(folder)
    assert sorted(upload_kw["allow_patterns"]) == sorted([*manifest["files"], "atlasformer.json"]) == plan["files"]
    assert {"model.safetensors", "config.json", "vocab.json", "tokenizer_config.json", "README.md"} <= set(plan["files"])
    assert plan["url"].endswith("/commit/1")


def test_push_refuses_incomplete_or_altered_folders(folder, fake_hub):
    assert push_model_folder(folder, "atlas-org/tiny", dry_run=True)["url"] is None and fake_hub == []
    (folder / "notes.txt").write_text("added by hand")
    with pytest.raises(CheckpointError, match=r"notes.txt.*not in atlasformer.json"):
        push_model_folder(folder, "atlas-org/tiny")
    (folder / "notes.txt").unlink()
    (folder / "README.md").unlink()
    with pytest.raises(CheckpointError, match="README.md"):
        push_model_folder(folder, "atlas-org/tiny")
    with pytest.raises(CheckpointError, match="org/name"):
        push_model_folder(folder, "not a repo id")
    assert fake_hub == []


def test_cli_hub_push(folder, fake_hub, capsys):
    assert main(["hub", "push", str(folder), "atlas-org/tiny", "--dry-run"]) == 0
    assert "dry run: nothing uploaded" in capsys.readouterr().out and fake_hub == []
    assert main(["hub", "push", str(folder), "atlas-org/tiny", "--private"]) == 0
    assert [c[0] for c in fake_hub] == ["create_repo", "upload_folder"] and fake_hub[0][2]["private"] is True
