#!/usr/bin/env bash
# The whole test suite: unit tests (tests/: tiny random models, the solver against slow
# oracles), the harness's tests (harness/tests/) and integration tests (the real
# embedded model: comparison, vLLM serving).
# Installs what it needs (the project venv; vLLM's own venv and the model/corpora are
# created in the cache on first use). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install.sh
python -m pytest -q -p no:cacheprovider --durations=15 tests harness/tests integration_tests "$@"

# Optional, off by default: the lower end of the torch range that llm-compressor 0.14
# accepts (torch 2.10), in its own venv kept in the cache. The first run installs it
# (measured: 5 min 20 s and 7.5 GB, since PyPI has only the CUDA build of torch 2.10
# for Linux); the solver and modifier tests then take about 2 min on one thread.
if [ "${RESCOMP_TEST_TORCH_MIN:-0}" = 1 ]; then
  MIN_VENV="${RESCOMP_CACHE:-$HOME/.cache/rescomp_modifiers}/venv-torch-2.10"
  [ -x "$MIN_VENV/bin/python" ] || python -m venv "$MIN_VENV"
  "$MIN_VENV/bin/python" -m pip install -q torch==2.10.0 -e ".[test]"
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$MIN_VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_compensation.py tests/test_modifiers.py
fi
