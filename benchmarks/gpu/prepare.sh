#!/usr/bin/env bash
# Gather what the GPU run (benchmarks/gpu/run.sh) carries to the device, where nothing can be
# downloaded: Python 3.12 wheels of the build's imports that the device image lacks, and
# GeoCLIP's location-encoder weights (38 MB) instead of its 40 MB wheel. Run it here, from
# any directory; it writes benchmarks/gpu/carry/ (ignored by git) and checks the 64 MiB limit.
#
#   PYTHON=.venv/bin/python benchmarks/gpu/prepare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
CARRY=benchmarks/gpu/carry
LIMIT=$((64 << 20))  # the device call's working tree, carried paths included

# The same versions as this environment's, so the device builds what the tests here check.
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
PACKAGES=("h3==$(version h3)" "faiss-cpu==$(version faiss-cpu)" "global-land-mask==$(version global-land-mask)")

rm -rf "$CARRY"
mkdir -p "$CARRY/wheels"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
# --no-deps: their needs (numpy, packaging) are in the device image.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$CARRY/wheels" "${PACKAGES[@]}"

# GeoCLIP's weights out of the installed geoclip wheel (sha256-checked by the loader; the
# run passes the file as --checkpoint, and the provenance records the same digest).
"$PY" - "$CARRY/geoclip_location_encoder.pth" <<'PYEOF'
import shutil
import sys

from builder.encoders.geoclip import WEIGHTS_SHA256, shipped_weights
from catalog.provenance import sha256_file

source = shipped_weights()
if sha256_file(source) != WEIGHTS_SHA256:
    sys.exit(f"{source} is not geoclip 1.3.0's file; reinstall: pip install --force-reinstall --no-deps geoclip==1.3.0")
shutil.copyfile(source, sys.argv[1])
PYEOF

carried=$(du -sb "$CARRY" | cut -f1)
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
total=$((carried + tree))
ls -l "$CARRY" "$CARRY/wheels" | grep -v '^total'
awk -v c="$carried" -v t="$tree" -v l="$LIMIT" 'BEGIN { printf "carried %.1f MB + working tree %.1f MB = %.1f MB of the %.1f MB (64 MiB) limit\n", c / 1e6, t / 1e6, (c + t) / 1e6, l / 1e6 }'
if [ "$total" -ge "$LIMIT" ]; then
  echo "over the device's 64 MiB: carry less" >&2
  exit 1
fi
