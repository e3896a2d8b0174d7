#!/usr/bin/env bash
# Downloads the wheels the GPU image lacks (benchmarks/device_wheels.txt) for
# CPython 3.12 on x86_64 Linux into a folder (default .whl/, ignored by git), on a
# machine with network access, before the GPU check: the GPU machine has none.
#   bash benchmarks/fetch_device_wheels.sh [DEST]
# Fails if the wheels exceed 64 MiB, the most that can travel with the work tree.
# pyarrow alone is 52 MiB as published (deflate): wheels over 4 MiB are rewritten
# with LZMA compression (the same files and RECORD; pip reads any zip method that
# Python's zipfile reads), which brings the whole set under the limit.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
mkdir -p "$DEST"
grep -v '^\s*#' benchmarks/device_wheels.txt | grep -v '^\s*$' | while read -r requirement; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST" "$requirement"
done
python3 - "$DEST" <<'PY'
import pathlib, sys, zipfile
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    if wheel.stat().st_size <= 4 * 2**20:
        continue
    with zipfile.ZipFile(wheel) as source:
        if all(info.compress_type == zipfile.ZIP_LZMA for info in source.infolist()):
            continue  # repacked by an earlier run
        repacked = wheel.with_suffix(".lzma")
        with zipfile.ZipFile(repacked, "w", compression=zipfile.ZIP_LZMA) as target:
            for info in source.infolist():
                target.writestr(info, source.read(info), compress_type=zipfile.ZIP_LZMA)
    before = wheel.stat().st_size
    repacked.replace(wheel)
    print(f"{wheel.name}: {before / 2**20:.1f} -> {wheel.stat().st_size / 2**20:.1f} MiB (LZMA)")
PY
size_kib=$(du -sk "$DEST" | cut -f1)
echo "wheels in $DEST: $(ls "$DEST" | wc -l) files, $((size_kib / 1024)) MiB"
if [ "$size_kib" -gt $((64 * 1024)) ]; then
  echo "error: the wheels exceed 64 MiB; drop what the GPU image already has from benchmarks/device_wheels.txt" >&2
  exit 1
fi
