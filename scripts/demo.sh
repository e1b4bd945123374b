#!/usr/bin/env bash
# The README's first run: preprocess the shipped sample corpus and pre-train a tiny model
# with TST through both phases on CPU (a few minutes), then plot the loss curve.
# Usage: scripts/demo.sh [VENV_DIR]     (make demo runs it after setting up the venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
py="$venv/bin/python"
out=runs/demo
data=data/processed
mkdir -p "$data" "$out"
export PYTHONWARNINGS=ignore OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

for split in train valid; do
  if [ ! -f "$data/sample_${split}_text_document.idx" ]; then
    "$py" tools/preprocess_data.py --input "data/sample/${split}.jsonl.gz" \
      --output-prefix "$data/sample_${split}" --tokenizer-type HuggingFaceTokenizer \
      --tokenizer-model data/sample --append-eod --workers 2
  fi
done

rm -rf "$out/checkpoints" "$out/metrics.jsonl"
"$py" -m torch.distributed.run --nproc-per-node 1 --master-port 29400 pretrain_tst.py \
  --yaml-config examples/demo.yaml \
  --train-data-path "$data/sample_train_text_document" \
  --valid-data-path "$data/sample_valid_text_document" \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/sample \
  --data-cache-path "$out/cache" --save "$out/checkpoints" --metrics-jsonl "$out/metrics.jsonl"

"$py" tools/plot_loss.py "$out/metrics.jsonl" --output "$out/loss_curve.png"
echo "checkpoint: $out/checkpoints (latest: iteration $(cat "$out/checkpoints/latest_checkpointed_iteration.txt"))"
echo "loss curve: $out/loss_curve.png"
