"""scripts/gpu_smoke.sh, the one-command check for the first GPU machine: valid bash, every command and override
it runs exists, and on a machine without CUDA it stops at once with an error that says what to install."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atlasformer.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_smoke.sh"


def test_the_smoke_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def option_strings(parser) -> set[str]:
    """Every flag of ``parser`` and of its subcommands, recursively."""
    flags = set()
    for action in parser._actions:
        flags |= set(action.option_strings)
        for child in (getattr(action, "choices", None) or {}).values() if hasattr(action, "add_parser") else ():
            flags |= option_strings(child)
    return flags


def test_every_flag_the_smoke_script_passes_exists():
    not_atlasformer = {"--standalone", "--nproc_per_node", "--index-url"}  # torchrun's, and pip's in a message
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z_-]*", SCRIPT.read_text())) - not_atlasformer
    assert used - option_strings(build_parser()) == set()
    for command in ("pretrain", "finetune", "predict", "embed"):
        assert re.search(rf"(launch \S+|\$AF\"(?: -v)?) {command} ", SCRIPT.read_text()), command


def test_without_cuda_the_smoke_script_stops_with_what_to_install():
    if torch.cuda.is_available():
        pytest.skip("a GPU machine: the script is the test itself (bash scripts/gpu_smoke.sh)")
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PY": sys.executable, "OUT": "/nonexistent/never-written"})
    assert proc.returncode == 1
    assert "no CUDA device" in proc.stderr and "CUDA build of torch" in proc.stderr
