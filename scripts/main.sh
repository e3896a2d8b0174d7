#!/usr/bin/env bash
# The main job on the embedded default: quantize SmolLM2-135M-Instruct (W3, group 64, 2
# calibration seeds) with RTN, stock GPTQ with min-max, MSE and imatrix_mse clipping, and
# the recommended CAE recipe (GPTAQ+CAE, imatrix_mse clipping, GPTQ guard),
# evaluate held-out perplexity on Brown and SOTU text, print the comparison table and
# plot it. About 20 min from a clean clone on 2 CPU cores; `--seeds 0` halves it.
# Extra arguments go to `rescomp compare` (see `rescomp compare --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install.sh
rescomp fetch
rescomp compare --output outputs/compare-default "$@"
