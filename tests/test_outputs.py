"""Nothing is lost (issue 13, items 1-3): no command deletes or overwrites what it did not write, refuses a
non-empty output folder that is not its own unless --overwrite, never writes over an input or into a folder
that must be replaced and holds one, and refuses two inputs that would write the same output file."""

import hashlib

import pytest
from test_convert_geneformer import GENES, make_geneformer_repo

from atlasformer.checkpoints import CheckpointError, convert_geneformer, export_model_folder
from atlasformer.cli import main
from atlasformer.model_zoo import CellTransformerConfig, CellTransformerForPretraining
from atlasformer.tokenization import CellTokenizer, GeneVocab, InputError
from atlasformer.tokenization.outputs import prepare_output_folder


def digest(folder):
    """SHA-256 of every file under ``folder`` (relative path -> hash)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def tiny_model(tmp_path, sim_adata):
    vocab = GeneVocab(list(sim_adata.var_names))
    config = CellTransformerConfig(vocab_size=len(vocab), d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                   max_seq_len=65, pad_token_id=vocab.pad_id)
    return export_model_folder(CellTransformerForPretraining(config), CellTokenizer(vocab), tmp_path / "m", {})


def test_convert_refuses_an_output_that_holds_its_source_and_keeps_user_files(tmp_path, capsys):
    src = tmp_path / "models" / "gf"
    make_geneformer_repo(src, GENES, subfolder=None)
    before = digest(tmp_path / "models")
    for out, message in ((src, "would be overwritten"), (tmp_path / "models", "holds the input")):
        assert main(["convert", "geneformer", str(src), str(out)]) == 2
        assert message in capsys.readouterr().err
    assert digest(tmp_path / "models") == before  # nothing deleted, source intact

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert main(["convert", "geneformer", str(src), str(mine)]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "--overwrite" in err
    assert (mine / "notes.txt").read_text() == "my notes"

    out = convert_geneformer(src, tmp_path / "out")
    convert_geneformer(src, out)  # its own folder: replaced
    (out / "extra.txt").write_text("added by the user")
    with pytest.raises(CheckpointError, match="extra.txt"):
        convert_geneformer(src, out)
    assert (out / "extra.txt").exists()
    convert_geneformer(src, out, overwrite=True)  # asked for: replaced
    assert not (out / "extra.txt").exists()


def test_pretrain_and_finetune_keep_user_files_in_model_folder(tmp_path, sim_h5ad, tiny_model, capsys):
    run = prepare_output_folder(tmp_path / "run")  # a run folder of ours, with a model folder a user added to
    (run / "model").mkdir(parents=True)
    (run / "model" / "keep.txt").write_text("user file")
    assert main(["pretrain", "--data", str(sim_h5ad), "--output", str(run), "model=tiny", "max_steps=2"]) == 2
    assert "keep.txt" in capsys.readouterr().err
    assert (run / "model" / "keep.txt").read_text() == "user file"
    assert not (run / "checkpoints").exists()  # refused before any training

    out = tmp_path / "ft"
    prepare_output_folder(out)  # one of ours, with a model folder a user added a file to
    (out / "model").mkdir()
    (out / "model" / "keep.txt").write_text("user file")
    args = ["finetune", "annotation", "--data", str(sim_h5ad), "--model", str(tiny_model), "--output", str(out),
            "--labels-key", "cell_type"]
    assert main(args) == 2
    assert "keep.txt" in capsys.readouterr().err
    assert (out / "model" / "keep.txt").read_text() == "user file"


def test_a_foreign_output_folder_is_refused_unless_overwrite(tmp_path, sim_h5ad, tiny_model, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.docx").write_text("do not lose")
    args = ["embed", "--data", str(sim_h5ad), "--model", str(tiny_model), "--output", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "thesis.docx" in err and "--overwrite" in err and not (out / "sim.h5ad").exists()
    assert main([*args, "--overwrite"]) == 0
    assert (out / "sim.h5ad").exists() and (out / "thesis.docx").read_text() == "do not lose"
    assert main(args) == 0  # now marked as ours: a rerun needs no flag


def test_embed_never_replaces_its_input(tmp_path, sim_h5ad, tiny_model, capsys):
    before = hashlib.sha256(sim_h5ad.read_bytes()).hexdigest()
    for flags in ([], ["--overwrite"]):
        assert main(["embed", "--model", str(tiny_model), "--data", str(sim_h5ad), "--output", str(sim_h5ad.parent),
                     *flags]) == 2
        assert "would be overwritten" in capsys.readouterr().err
    assert hashlib.sha256(sim_h5ad.read_bytes()).hexdigest() == before


def test_two_inputs_of_one_name_are_refused_before_any_work(tmp_path, sim_adata, tiny_model, capsys):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        sim_adata.write_h5ad(tmp_path / sub / "cells.h5ad")
    for command in (["embed"], ["predict", "annotation"]):
        out = tmp_path / f"out_{command[0]}"
        assert main([*command, "--model", str(tiny_model), "--data", str(tmp_path / "a" / "cells.h5ad"),
                     str(tmp_path / "b" / "cells.h5ad"), "--output", str(out)]) == 2
        assert "would both be written to cells.h5ad" in capsys.readouterr().err
        assert not (out / "cells.h5ad").exists()


def test_output_rules_as_a_function(tmp_path):
    data = tmp_path / "d" / "x.h5ad"
    data.parent.mkdir()
    data.write_text("")
    with pytest.raises(InputError, match="holds the input"):
        prepare_output_folder(tmp_path, [data], overwrite=True)
    with pytest.raises(InputError, match="would be overwritten"):
        prepare_output_folder(data, [data])
    with pytest.raises(InputError, match="must be a folder"):
        prepare_output_folder(data, [])
    assert prepare_output_folder(tmp_path / "new", [data]).is_dir()


def test_output_files_are_replaced_whole_or_not_at_all(tmp_path):
    """Every output file goes through atomic_path: a write that fails leaves the old file and no temporary
    file; one that succeeds replaces it (JSON, CSV, figures and h5ad alike)."""
    import anndata as ad
    import pandas as pd

    from atlasformer.finetune.common import write_h5ad_atomic
    from atlasformer.finetune.plots import new_figure, save_figure
    from atlasformer.tokenization.corpus_format import write_json_atomic
    from atlasformer.tokenization.outputs import atomic_path, write_csv_atomic

    target = tmp_path / "out" / "metrics.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(TypeError):  # fails half-way through the dump
        write_json_atomic(target, {"a": 2, "b": object()}, default=None)
    assert target.read_text() == '{\n "a": 1\n}' and sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == '{\n "a": 1\n}' and sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]
    write_csv_atomic(pd.DataFrame({"x": [1, 2]}), tmp_path / "out" / "t.csv")
    save_figure(new_figure(2, 2), tmp_path / "out" / "f.png")
    write_h5ad_atomic(ad.AnnData(pd.DataFrame({"g": [1.0]})), tmp_path / "out" / "a.h5ad")
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.h5ad", "f.png", "metrics.json", "t.csv"]
    assert (tmp_path / "out" / "t.csv").read_text() == "x\n1\n2\n"
    assert (tmp_path / "out" / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_a_marker_written_by_another_rank_while_checking_is_not_foreign(tmp_path, monkeypatch):
    """Ranks of a launch check the output folder while rank 0 marks it: a marker that appears between the
    listing and the ownership check must not make the folder look foreign (it failed a 2-process pretraining)."""
    from atlasformer.tokenization import outputs

    folder = tmp_path / "run"
    folder.mkdir()
    listed = type(folder).iterdir

    def list_while_rank_0_marks(self):
        if self == folder:  # rank 0 writes its marker just as this rank lists the folder
            (folder / outputs.MARKER).write_text("{}\n")
        return listed(self)

    with monkeypatch.context() as patch:
        patch.setattr(type(folder), "iterdir", list_while_rank_0_marks)
        outputs.refuse_foreign_folder(folder)  # the listing holds the marker, which the check then sees: no error
    assert (folder / outputs.MARKER).is_file()
    (folder / "notes.txt").write_text("user file\n")
    (folder / outputs.MARKER).unlink()
    with pytest.raises(InputError, match="did not write"):  # a user's file without a marker is still refused
        outputs.refuse_foreign_folder(folder)
