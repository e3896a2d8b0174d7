#!/usr/bin/env bash
# The main job on the embedded default: quantize SmolLM2-135M-Instruct with RTN, GPTQ,
# GPTQ+CAE, GPTAQ, GPTAQ+CAE and FOEM (W3, group 64, 2 calibration seeds), evaluate
# held-out perplexity, print the comparison table. About 15 minutes on 2 CPU cores.
# Extra arguments go to `rescomp compare` (see `rescomp compare --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install.sh
rescomp fetch
rescomp compare --output outputs/compare-default "$@"
