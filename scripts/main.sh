#!/usr/bin/env bash
# The main job on the embedded default: quantize SmolLM2-135M-Instruct with RTN, GPTQ,
# GPTQ+CAE, GPTAQ, GPTAQ+CAE and FOEM (W3, group 64, 2 calibration seeds), evaluate
# held-out perplexity, print the comparison table. Measured from a clean clone on 2
# CPU cores: 17 min in all (install ~1 min; quantization 52-69 s for GPTQ, GPTQ+CAE and
# FOEM, 80-84 s for the dual-stream GPTAQ and GPTAQ+CAE; ~20 s of evaluation each);
# `--seeds 0` halves it.
# Extra arguments go to `rescomp compare` (see `rescomp compare --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install.sh
rescomp fetch
rescomp compare --output outputs/compare-default "$@"
