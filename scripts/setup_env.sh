#!/usr/bin/env bash
# Create the project's virtual environment (idempotent): CPU torch pinned first so pip never
# pulls the multi-GB CUDA wheels, then this package with the extras named in $EXTRAS.
# Usage: scripts/setup_env.sh [VENV_DIR]   (env: EXTRAS=test,plot  TORCH_INDEX_URL=...)
set -euo pipefail
venv="${1:-.venv}"
extras="${EXTRAS:-test,plot,data,hf}"
stamp="$venv/.tst-installed-$extras"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "$venv/bin/python" -m pip install -q torch==2.13.0 --index-url "$TORCH_INDEX_URL"
else
  "$venv/bin/python" -m pip install -q torch==2.13.0
fi
"$venv/bin/python" -m pip install -q -e ".[$extras]"
touch "$stamp"
