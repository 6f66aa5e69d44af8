#!/usr/bin/env bash
# Run the whole LSI-Guard study (dvc repro) on the embedded default model and the demo data.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
# DVC needs a git repository; a tarball checkout gets a fresh one.
[ -d .git ] || git init -q
[ -d .dvc ] || dvc init -q
dvc repro "$@"
dvc metrics show
