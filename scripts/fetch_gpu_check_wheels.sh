#!/usr/bin/env bash
# Download the wheels examples/gpu_check.sh installs on a GPU machine without internet into
# .whl/ (git-ignored; carry it along, e.g. the device tool's `carry: [".whl"]`). The target's
# PyTorch, numpy, packaging, pyyaml and psutil are used as they are; only Megatron-Core (a
# platform wheel: it ships compiled dataset helpers) is fetched, for the target's Python: 0.19.x
# for Python >= 3.12, 0.16.1 for 3.10/3.11 (pyproject.toml's markers).
#
#   scripts/fetch_gpu_check_wheels.sh            # CPython 3.12, x86-64 manylinux
#   PY_VERSION=3.11 scripts/fetch_gpu_check_wheels.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
DEST=${WHEELS:-.whl}
case "$PY_VERSION" in
  3.1[01]) MCORE="megatron-core~=0.16.1" ;;
  *) MCORE="megatron-core>=0.19.2,<0.20" ;;
esac
mkdir -p "$DEST"
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 -d "$DEST" "$MCORE"
ls -l "$DEST"
