#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs what it needs.
# Sourced by scripts/main.sh and scripts/test.sh; safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${RESCOMP_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first, pinned: without CUDA the pinned CPU wheel (a bare `torch` or an open
# range would pull several GB of CUDA packages); with CUDA, the user's usual build.
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q torch==2.13.0
  fi
fi
# the plugin and, as its own distribution, the evaluation harness (harness/)
python -m pip install -q -e ".[test]" -e ./harness
