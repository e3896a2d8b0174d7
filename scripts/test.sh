#!/usr/bin/env bash
# The whole test suite: unit tests (tiny random models, the solver against slow
# oracles) and integration tests (the real embedded model: comparison, vLLM serving).
# Installs what it needs (the project venv; vLLM's own venv and the model/corpora are
# created in the cache on first use). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install.sh
python -m pytest -q -p no:cacheprovider --durations=15 tests integration_tests "$@"
