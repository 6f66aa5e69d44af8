#!/usr/bin/env bash
# Make sure Debian's chromium is installed: the web demo's browser test drives it through
# Playwright, which never downloads a browser of its own. Quiet when chromium is already there.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "[browser] chromium is not installed; the browser test needs it. Install it with:" >&2
  echo "    sudo apt-get update && sudo apt-get install -y chromium" >&2
  exit 1
fi
echo "[browser] installing Debian's chromium for the browser test"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium
command -v chromium >/dev/null 2>&1 || { echo "[browser] chromium is still missing after apt-get" >&2; exit 1; }
