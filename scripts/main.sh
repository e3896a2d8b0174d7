#!/usr/bin/env bash
# The main job on the embedded default: quantize SmolLM2-135M-Instruct with RTN, GPTQ,
# GPTQ+CAE, GPTAQ, GPTAQ+CAE and FOEM (W3, group 64, 2 calibration seeds), evaluate
# held-out perplexity, print the comparison table. One SmolLM2 quantization of 8k
# calibration tokens took 2-3 min on 2 quiet cores (measured), so expect about 30 min
# for the 12 runs; `--seeds 0` halves it.
# Extra arguments go to `rescomp compare` (see `rescomp compare --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install.sh
rescomp fetch
rescomp compare --output outputs/compare-default "$@"
