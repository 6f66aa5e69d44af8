#!/usr/bin/env bash
# Run the test suite (set-up included). Extra arguments go to pytest, e.g. -m "not slow".
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh || exit 1
# The web demo's browser test drives Debian's chromium; without it that test skips (and fails under CI).
bash scripts/browser.sh || echo "[test] chromium is not installed: the browser test will skip here, and fail under CI" >&2
python -m pytest "$@"
status=$?
# pytest exits 5 when it collected nothing: that is a broken suite, not a pass.
if [ "$status" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
