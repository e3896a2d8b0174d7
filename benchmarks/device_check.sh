#!/usr/bin/env bash
# The device check on a GPU machine without network whose Python already has torch and
# transformers: installs what it lacks from the wheels that travelled with the work tree
# (bash benchmarks/fetch_device_wheels.sh, run beforehand where there is network), into
# a venv that sees the machine's own packages, then runs benchmarks/device_check.py.
#   bash benchmarks/device_check.sh [device_check.py options, e.g. --budget-s 420]
# Results: $OUT/device_check/device_check.{md,json} (or outputs/device_check/ without $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${RESCOMP_WHEELS:-.whl}"
VENV="${RESCOMP_DEVICE_VENV:-/tmp/rescomp-device-venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
if ! "$VENV/bin/python" -c "import llmcompressor, pytest" 2>/dev/null; then
  if [ ! -d "$WHEELS" ]; then
    echo "error: llmcompressor is not installed and the wheel folder $WHEELS is missing:" \
         "run bash benchmarks/fetch_device_wheels.sh where there is network, and carry .whl" >&2
    exit 1
  fi
  # pip takes from the folder only what the machine's Python lacks
  "$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" \
    llmcompressor==0.14.0.1 pytest
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV/bin/python" benchmarks/device_check.py "$@"
