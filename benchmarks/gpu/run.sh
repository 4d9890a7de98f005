#!/usr/bin/env bash
# The GPU build benchmark in one device call (benchmarks/gpu/README.md): install the carried
# wheels, build SatCLIP L=40 (random weights) and GeoCLIP over land, report to $OUT/gpu-run.json.
#
# Settings (environment): DEVICE (cuda; cpu for the dry run), RESOLUTIONS (0-7), MODELS
# (satclip,geoclip), PRECISION (auto: float16 when the disk holds it, else int8), SAMPLE
# (cells a resolution checked against the CPU), WORK (where the atlases go), BUDGET_S (the
# run stops itself after this many seconds and keeps what it measured; the device allows 600),
# PYTHON (python3), CARRY (benchmarks/gpu/carry: what prepare.sh gathered), BATCH_SIZE,
# INSTALL_WHEELS (1; 0 where the build's packages are installed already).
# Dry run here: DEVICE=cpu RESOLUTIONS=0-2 OUT=$(mktemp -d) PYTHON=.venv/bin/python benchmarks/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the folder for gpu-run.json}"
PY=${PYTHON:-python3}
CARRY=${CARRY:-benchmarks/gpu/carry}
SITE=${SITE:-/tmp/hexatlas-site}
WORK=${WORK:-/tmp/hexatlas-gpu}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
start=$(date +%s)

main() {
  # The build's imports that the device image lacks; --no-deps: their needs are there.
  shopt -s nullglob
  local wheels=("$CARRY"/wheels/*.whl)
  if [ "${INSTALL_WHEELS:-1}" = 1 ] && [ ${#wheels[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${wheels[@]}" || { echo "installing the carried wheels failed"; return 2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed ${#wheels[@]} wheels into $SITE in $(($(date +%s) - start)) s"
  fi
  "$PY" -c "import faiss, h3, global_land_mask, torch" \
    || { echo "the build's imports are missing: run benchmarks/gpu/prepare.sh and carry $CARRY"; return 2; }
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  fi
  df -h "$WORK" | tail -1

  local args=(--device "${DEVICE:-cuda}" --resolutions "${RESOLUTIONS:-0-7}" --models "${MODELS:-satclip,geoclip}"
              --precision "${PRECISION:-auto}" --sample "${SAMPLE:-2048}" --work "$WORK" --out "$OUT"
              --geoclip-weights "$CARRY/geoclip_location_encoder.pth")
  if [ -n "${BATCH_SIZE:-}" ]; then args+=(--batch-size "$BATCH_SIZE"); fi
  # SIGINT at the budget: the driver records "interrupted" and keeps the models it finished.
  timeout --signal=INT --kill-after=20 "${BUDGET_S:-540}" "$PY" -m benchmarks.gpu.run "${args[@]}"
}

main 2>&1 | tee "$OUT/run.log"
rc=${PIPESTATUS[0]}
echo "exit $rc after $(($(date +%s) - start)) s" | tee -a "$OUT/run.log"
exit "$rc"
