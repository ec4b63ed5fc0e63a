"""Nothing in a checkpoint executes code: pickles that would run code are refused before anything runs
(Geneformer dictionaries through the restricted unpickler, scGPT .pt files through weights-only
torch.load), models load from safetensors only, tampered files fail their SHA-256, and no code path
passes trust_remote_code."""

import ast
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from atlasformer.checkpoints import (
    CheckpointError,
    convert_scgpt,
    export_model_folder,
    load_model,
)
from atlasformer.model_zoo import CellTransformerConfig, CellTransformerForPretraining
from atlasformer.tokenization import CellTokenizer, GeneVocab, InputError
from atlasformer.tokenization.convert import safe_load_pickle

REPO = Path(__file__).resolve().parents[1]


class RunsCode:
    """Unpickling this calls os.system, creating ``marker`` if it ever runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class CallsEval:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


@pytest.mark.parametrize("protocol", [2, 4])
def test_code_running_pickle_is_refused_and_never_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps({"<pad>": 0, "ENSG00000000001": RunsCode(marker)}, protocol=protocol))
    with pytest.raises(InputError, match=r"refused to load (posix|os)\.system"):
        safe_load_pickle(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the plain unpickler would have run it: the test's pickle is real
    assert marker.exists()


def test_other_dangerous_pickles_are_refused(tmp_path):
    (tmp_path / "eval.pkl").write_bytes(pickle.dumps(CallsEval()))
    with pytest.raises(InputError, match="builtins.eval"):
        safe_load_pickle(tmp_path / "eval.pkl")
    (tmp_path / "objects.pkl").write_bytes(pickle.dumps(np.array([1, "a"], dtype=object)))
    with pytest.raises(InputError, match="dtype"):
        safe_load_pickle(tmp_path / "objects.pkl")


@pytest.mark.parametrize("protocol", [2, 4])
def test_plain_dictionaries_with_numpy_numbers_load(tmp_path, protocol):
    data = OrderedDict({"<pad>": np.int64(0), "ENSG00000000001": np.float64(1.5), "ids": np.arange(3), "s": {1, 2}})
    (tmp_path / "d.pkl").write_bytes(pickle.dumps(data, protocol=protocol))
    loaded = safe_load_pickle(tmp_path / "d.pkl")
    assert loaded["ENSG00000000001"] == 1.5 and list(loaded["ids"]) == [0, 1, 2] and loaded["s"] == {1, 2}


def test_scgpt_pt_file_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "scgpt"
    folder.mkdir()
    torch.save({"encoder.embedding.weight": torch.zeros(4, 8), "payload": RunsCode(marker)}, folder / "best_model.pt")
    (folder / "vocab.json").write_text('{"<pad>": 0, "<cls>": 1, "A": 2, "B": 3}')
    (folder / "args.json").write_text('{"nheads": 2}')
    with pytest.raises(CheckpointError, match="refused or unreadable as a weights-only state dict"):
        convert_scgpt(folder, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_models_load_from_safetensors_only_and_tampering_is_caught(tmp_path):
    config = CellTransformerConfig(vocab_size=8, d_model=16, n_layers=1, n_heads=2)
    model = CellTransformerForPretraining(config)
    folder = export_model_folder(model, CellTokenizer(GeneVocab(["A", "B", "C", "D", "E"])), tmp_path / "m", {})
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # a pickle-format file is not read
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)
    (folder / "pytorch_model.bin").rename(folder / "model.safetensors")
    (folder / "config.json").write_text((folder / "config.json").read_text().replace('"n_heads": 2', '"n_heads": 1'))
    with pytest.raises(CheckpointError, match="config.json does not match its SHA-256"):
        load_model(folder)


def test_no_code_path_passes_trust_remote_code():
    offenders = []
    for package in ("atlasformer", "tokenization", "model_zoo", "checkpoints", "pretrain", "finetune", "analysis", "scripts",
                    "benchmarks"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                    offenders.append(f"{path.relative_to(REPO)}:{node.value.lineno}")
    assert not offenders, offenders
