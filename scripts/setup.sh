#!/usr/bin/env bash
# Create .venv and install atlasformer with its dev extras.
# Where no CUDA GPU is present, torch is pinned to 2.13.0 (a CPU build; an unpinned torch downloads
# several GB of CUDA build). With a GPU, the regular torch wheel is installed.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS-dev,deepspeed,wandb}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: CUDA GPU found, installing the regular torch build"
    $PIP install -q "torch>=2.4,<2.15"
else
    echo "setup: no CUDA GPU, installing torch==2.13.0 (CPU)"
    $PIP install -q "torch==2.13.0"
fi
if [ -n "$EXTRAS" ]; then $PIP install -q -e ".[$EXTRAS]"; else $PIP install -q -e .; fi
# reference implementations used by parity tests and benchmarks (scgpt's own dependencies would pull
# torchtext and an old torch, so it is installed without them; the tests provide what it imports)
if [ "${WITH_REFERENCE:-1}" = "1" ]; then
    $PIP install -q --no-deps "scgpt==0.2.4"
fi
echo "setup: done ($($VENV/bin/python -c 'import torch, atlasformer; print("torch", torch.__version__, "atlasformer", atlasformer.__version__)'))"
