"""The dependency direction of the layout: tokenization and model_zoo are leaves, model_zoo never imports
anndata, checkpoints (model folders) uses those two, pretrain uses those three, finetune uses all four, analysis uses all five, nothing
imports the root or scripts/; model-folder I/O is imported from checkpoints only."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("tokenization", "model_zoo", "checkpoints", "pretrain", "finetune", "analysis")
ROOT_MODULES = {"atlasformer.cli", "atlasformer.cli_analysis", "atlasformer.config", "atlasformer.api", "atlasformer.settings", "atlasformer"}

# stage -> atlasformer stages it may import
ALLOWED = {
    "tokenization": set(),
    "model_zoo": set(),
    "checkpoints": {"tokenization", "model_zoo"},
    "pretrain": {"tokenization", "model_zoo", "checkpoints"},
    "finetune": {"tokenization", "model_zoo", "checkpoints", "pretrain"},
    "analysis": {"tokenization", "model_zoo", "checkpoints", "pretrain", "finetune"},
}
# model-folder I/O: writing, reading, resolving, converting, pushing; one home, atlasformer.checkpoints
FOLDER_IO = {"export_model_folder", "load_model_folder", "load_model", "resolve_model", "read_manifest", "write_manifest",
             "atomic_folder", "push_model_folder", "convert_scgpt", "convert_geneformer", "save_vae_folder",
             "load_vae_folder", "load_weights_only", "load_safetensors"}
FORBIDDEN_THIRD_PARTY = {"model_zoo": {"anndata", "scanpy", "mudata", "tiledbsoma"}}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("stage", STAGES)
def test_stage_imports_point_one_way(stage):
    for path in sorted((REPO / stage).rglob("*.py")):
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[0] in STAGES or parts[0] == "scripts":
                pytest.fail(f"{path}: imports {name!r} by its folder name; use atlasformer.{parts[0]}")
            if parts[0] == "atlasformer":
                target = parts[1] if len(parts) > 1 else ""
                assert name not in ROOT_MODULES and target not in ("cli", "cli_analysis", "config", "api", "settings", ""), (
                    f"{path}: imports the root package ({name}); nothing below the root may")
                if target in STAGES and target != stage:
                    assert target in ALLOWED[stage], f"{path}: {stage} may not import atlasformer.{target}"
            assert parts[0] not in FORBIDDEN_THIRD_PARTY.get(stage, set()), f"{path}: {stage} may not import {parts[0]}"


def test_model_folder_io_is_imported_from_checkpoints_only():
    """No stage, script or test imports model-folder I/O from anywhere but atlasformer.checkpoints (finetune uses
    the pretrain engine for its fit loop, never pretrain for folders)."""
    folders = [*STAGES, "atlasformer", "scripts", "benchmarks", "tests"]
    for path in sorted(p for folder in folders for p in (REPO / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("atlasformer"):
                names = {alias.name for alias in node.names} & FOLDER_IO
                assert not names or node.module.startswith("atlasformer.checkpoints"), (
                    f"{path}: imports {sorted(names)} from {node.module}; model folders live in atlasformer.checkpoints")


def test_nothing_imports_scripts():
    for path in list(REPO.rglob("*.py")):
        if ".venv" in path.parts or "scripts" in path.parts:
            continue
        for name in imported_modules(path):
            assert not name.startswith("scripts"), f"{path} imports {name}"


def test_model_zoo_runtime_does_not_load_anndata():
    code = "import sys, atlasformer.model_zoo; print('anndata' in sys.modules, 'atlasformer.tokenization' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"], out


def test_only_atlasformer_is_installed_as_top_level(tmp_path):
    """Outside the checkout, the generic folder names are not importable: only atlasformer is installed."""
    code = ("import importlib.util as u; print([n for n in ('tokenization', 'finetune', 'model_zoo', 'checkpoints', 'pretrain', 'analysis') "
            "if u.find_spec(n)]); import atlasformer.tokenization, atlasformer.checkpoints, atlasformer.finetune, "
            "atlasformer.analysis")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]"


def test_wheel_installs_only_atlasformer(tmp_path):
    """A normal (non-editable) install ships one top-level package, with configs and package data."""
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("atlasformer-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"atlasformer"}, top
    for required in ("atlasformer/cli.py", "atlasformer/tokenization/tokenizer.py", "atlasformer/model_zoo/cell_transformer.py",
                     "atlasformer/checkpoints/folder.py", "atlasformer/pretrain/train.py", "atlasformer/finetune/fit.py",
                     "atlasformer/analysis/__init__.py",
                     "atlasformer/configs/model/tiny.yaml"):
        assert required in names, required
