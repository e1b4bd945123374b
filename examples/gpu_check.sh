#!/usr/bin/env bash
# One-GPU acceptance check of tst-megatron's production path (bf16/fp16 TST runs through the
# phase boundary, mid-run save and exact resume, a local-spec MoE, the fused losses on CUDA
# with the weight-gradient accumulation path they took, step time and MFU against a floor).
# Needs one NVIDIA GPU and a PyTorch CUDA install; what it cannot run here (Transformer Engine
# + FP8, apex, NCCL across ranks, Megatron-FSDP) is a SKIP row with the reason. Megatron-Core
# is installed from wheels in $WHEELS when it is missing (scripts/fetch_gpu_check_wheels.sh
# downloads them). Budget: < 8 minutes on an H100; every run has its own timeout.
# What it runs and checks: tst_megatron/testing/gpu_check.py; docs/gpu.md.
#
#   examples/gpu_check.sh               # one PASS/FAIL/SKIP row per check; exit 1 on any FAIL
#   examples/gpu_check.sh --require-te  # Transformer Engine / FP8 missing is a FAIL, not a SKIP
#   examples/gpu_check.sh --dry-run     # every row and command, runs nothing (no GPU needed)
#
# Environment: PYTHON (python3), WHEELS (.whl), OUT (runs/gpu_check: summary.txt, written row
# by row as the checks end, logs/, gpu_check.json), GPU_CHECK_WORK (/tmp/gpu_check:
# checkpoints).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "gpu_check.sh: $*" >&2; exit 2; }
dry_run=0
for arg in "$@"; do [[ $arg == --dry-run ]] && dry_run=1; done

if ! "$PYTHON" -c 'import megatron.core' 2>/dev/null; then
    compgen -G "$WHEELS/*.whl" >/dev/null \
        || die "Megatron-Core is not importable and $WHEELS/ holds no wheels: run scripts/fetch_gpu_check_wheels.sh where pip can reach PyPI"
    site=${TMPDIR:-/tmp}/gpu_check_site
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$PYTHONPATH:$site"
fi
if [[ $dry_run == 0 ]]; then
    command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: this needs an NVIDIA GPU"
    "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
        || die "$PYTHON's torch sees no CUDA device (a CPU-only build?)"
fi
exec "$PYTHON" -m tst_megatron.testing.gpu_check "$@"
