#!/usr/bin/env bash
# One-GPU smoke test of pretrain_tst.py with Transformer Engine: the TST 270M config on mock
# data for a few hundred steps (phase 1 for the first 30%, then phase 2), once in bf16 and once
# with FP8 GEMMs (hybrid E4M3/E5M2 with delayed scaling; MXFP8 on Blackwell). Each run
# logs loss, TFLOP/s per GPU and MFU every LOG_INTERVAL steps and appends its records to
# $OUT/<run>.jsonl; a summary of both runs is printed at the end (phase-1 multi-hot loss at
# the boundary, final next-token loss, validation loss, TFLOP/s and MFU).
#
#   examples/gpu_smoke.sh                       # from anywhere, e.g. inside the NGC image
#   CONFIG=examples/configs/tst-600m.yaml ITERS=500 examples/gpu_smoke.sh
#
# Environment: CONFIG, ITERS (300), MICRO_BATCH (8), GLOBAL_BATCH (32), LOG_INTERVAL (25),
# OUT (runs/gpu_smoke), PYTHON (python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CONFIG=${CONFIG:-examples/configs/tst-270m.yaml}
ITERS=${ITERS:-300}
MICRO_BATCH=${MICRO_BATCH:-8}
GLOBAL_BATCH=${GLOBAL_BATCH:-32}
LOG_INTERVAL=${LOG_INTERVAL:-25}
OUT=${OUT:-runs/gpu_smoke}
PYTHON=${PYTHON:-python}

die() { echo "gpu_smoke.sh: $*" >&2; exit 2; }
command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: this needs an NVIDIA GPU node"
nvidia-smi -L >/dev/null 2>&1 || die "nvidia-smi finds no GPU (driver not loaded?)"
"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || die "$PYTHON's torch sees no CUDA device (a CPU-only build?); use the NGC image (docs/docker.md)"
"$PYTHON" -c 'import transformer_engine.pytorch' 2>/dev/null \
    || die "Transformer Engine is not installed; use the NGC image (docs/docker.md)"

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)
case "$gpu" in  # Blackwell: MXFP8 (E4M3 blocks, as Megatron-LM recommends); Hopper: hybrid
    *B200* | *B100* | *GB200* | *GB300* | *B300*) fp8=(--fp8-format e4m3 --fp8-recipe mxfp8) ;;
    *) fp8=(--fp8-format hybrid --fp8-recipe delayed) ;;
esac
echo "GPU: $gpu; config $CONFIG; $ITERS steps of $GLOBAL_BATCH samples (micro-batch $MICRO_BATCH)"
mkdir -p "$OUT"

# Mock data and a null tokenizer replace the config's data paths and tokenizer; the LR
# schedule is shortened to fit the run.
common=(
    --yaml-config "$CONFIG" --data-path --mock-data --tokenizer-type NullTokenizer
    --train-iters "$ITERS" --lr-warmup-iters $((ITERS / 10)) --lr-wsd-decay-iters $((ITERS / 10))
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
    --log-interval "$LOG_INTERVAL" --eval-interval "$ITERS" --eval-iters 4
    --transformer-impl transformer_engine --bf16
)
run() {
    local name=$1
    shift
    echo "=== $name ==="
    rm -f "$OUT/$name.jsonl"
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 pretrain_tst.py \
        "${common[@]}" --metrics-jsonl "$OUT/$name.jsonl" "$@" 2>&1 | tee "$OUT/$name.log"
}
run bf16
run fp8 "${fp8[@]}"

"$PYTHON" - "$OUT" "$gpu" <<'PY'
import json, sys
from pathlib import Path

from tst_megatron.training.flops import peak_tflops_for_device

out, gpu = Path(sys.argv[1]), sys.argv[2]
print(f"\nsummary ({gpu}; TFLOP/s and MFU: mean over the second half of the logged steps)")
print(f"{'run':6} {'phase-1 loss':>12} {'final loss':>10} {'valid loss':>10} "
      f"{'TFLOP/s/GPU':>12} {'MFU':>6}")
for name, fp8 in (("bf16", False), ("fp8", True)):
    rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "lm_loss" in row]
    phase1 = [row["lm_loss"] for row in steps if row["phase"] == 1] or [float("nan")]
    valid = [row["valid_lm_loss"] for row in rows if "valid_lm_loss" in row] or [float("nan")]
    late = steps[len(steps) // 2:]
    tflops = sum(row["tflops_per_gpu"] for row in late) / len(late)
    peak = peak_tflops_for_device(gpu, fp8=fp8)
    mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
    print(f"{name:6} {phase1[-1]:12.4f} {steps[-1]['lm_loss']:10.4f} {valid[-1]:10.4f} "
          f"{tflops:12.1f} {mfu:>6}")
PY
