#!/usr/bin/env bash
# Download the wheels examples/gpu_check.sh installs on a GPU machine without internet into
# .whl/ (git-ignored; carry it along, e.g. the device tool's `carry: [".whl"]`). The target's
# PyTorch, numpy, packaging, pyyaml and psutil are used as they are; only Megatron-Core (a
# platform wheel: it ships compiled dataset helpers) is fetched, for the target's Python.
#
#   scripts/fetch_gpu_check_wheels.sh            # CPython 3.12, x86-64 manylinux
#   PY_VERSION=3.11 scripts/fetch_gpu_check_wheels.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
DEST=${WHEELS:-.whl}
mkdir -p "$DEST"
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 -d "$DEST" "megatron-core==0.16.1"
ls -l "$DEST"
