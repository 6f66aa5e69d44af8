#!/usr/bin/env bash
# Start the LSI-Guard web demo on http://127.0.0.1:7860 (local only). Extra arguments go to
# `python -m lsi_guard_app.web`, e.g. --port 8000 or --policy lsi_then_ecso.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
# The demo needs a trained probe and its calibrated tau: a fresh clone runs the pipeline first.
if [ ! -f data/probe/probe.safetensors ] || [ ! -f data/calibration/calibration.json ]; then
  echo "[demo] no trained probe or calibration yet: running the pipeline first (bash scripts/run.sh)"
  bash scripts/run.sh
fi
exec python -m lsi_guard_app.web --run . "$@"
