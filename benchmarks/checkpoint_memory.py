"""Peak resident memory per rank during a checkpoint save, against that rank's optimizer shard.

DP=2 (two gloo ranks on CPU), ``--use-distributed-optimizer``, the real trainer
(`tst_megatron.training.loop.Trainer`, one training step so that the optimizer state
exists), then one save in each distributed-optimizer format:

* ``dp_reshardable`` (the default): each rank writes its own shard (fully parallel save);
* ``fully_reshardable`` (``--ckpt-fully-reshardable``): every optimizer buffer is gathered
  onto each data-parallel rank first.

Figures per rank, each measured in the same run:
  shard   = bytes of this rank's optimizer state (fp32 main params + Adam moments)
  peak    = rise of the rank process's peak RSS during the save (``VmHWM`` after resetting it
            through ``/proc/self/clear_refs``) plus the largest unique memory (USS) of the
            writer processes Megatron-Core forks (sampled every 10 ms)
  ratio   = peak / shard (target: <= 1.3 plus a fixed overhead)

Usage: torchrun --nproc-per-node 2 benchmarks/checkpoint_memory.py [--hidden-size 1024]
       [--num-layers 4] [--out DIR]   (prints one JSON line per format from rank 0)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class ChildPeak:
    """Largest USS of this process's descendants (Megatron-Core's forked writers)."""

    def __init__(self) -> None:
        import psutil

        self.me, self.peak, self.done = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self.done.is_set():
            for child in self.me.children(recursive=True):
                try:
                    if "multiprocessing" in " ".join(child.cmdline()):
                        continue  # the long-lived results manager, not a writer
                    self.peak = max(self.peak, child.memory_full_info().uss)
                except psutil.Error:
                    pass
            time.sleep(0.01)

    def __enter__(self) -> ChildPeak:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def optimizer_shard_bytes(optimizer) -> int:
    from tst_megatron.training.optimizer import _inner_optimizers

    total = 0
    for megatron_optimizer in _inner_optimizers(optimizer):
        inner = megatron_optimizer.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                total += param.numel() * param.element_size()
                for value in inner.state.get(param, {}).values():
                    if hasattr(value, "numel") and value.numel() > 1:
                        total += value.numel() * value.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--out", default=None, help="checkpoint directory (default: a temp dir)")
    options = parser.parse_args()

    import torch

    from tst_megatron.training.checkpointing import Checkpointer
    from tst_megatron.training.loop import Trainer, initialize_distributed, shutdown_distributed
    from tst_megatron.training.run_config import settings_from_flags

    # one directory for all ranks (the launch's rendezvous port tells them apart from others)
    out = options.out or os.path.join(
        tempfile.gettempdir(), f"ckpt_memory_{os.environ.get('MASTER_PORT', '0')}"
    )
    h = options.hidden_size
    run = settings_from_flags([
        "--num-layers", str(options.num_layers), "--hidden-size", str(h),
        "--num-attention-heads", str(max(1, h // 64)), "--seq-length", "64",
        "--transformer-impl", "local", "--distributed-backend", "gloo",
        "--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "1e-4",
        "--train-iters", "1", "--log-interval", "1", "--eval-iters", "0",
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "32000",
        "--use-distributed-optimizer", "--save", out, "--save-interval", "1000",
    ], int(os.environ["WORLD_SIZE"]))  # fmt: skip
    checkpoints = Checkpointer(run.checkpoint)
    initialize_distributed(run.parallel, run.batch, run.reliability, run.schedule.seed)
    rank = torch.distributed.get_rank()
    try:
        checkpoints.open()
        trainer = Trainer(run, checkpoints)
        trainer.train_step(trainer.phase_spec(1))  # optimizer state exists from here on
        trainer.progress.iteration = 1
        shard = optimizer_shard_bytes(trainer.optimizer)
        params = sum(p.numel() for chunk in trainer.chunks for p in chunk.parameters())
        trainer.save()  # warm-up: the writer-results manager, cached save strategy
        for fully in (False, True):
            checkpoints.config = dataclasses.replace(
                checkpoints.config, ckpt_fully_reshardable=fully
            )
            trainer.progress.iteration += 1
            torch.distributed.barrier()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            before = _vm("VmRSS")
            start = time.time()
            with ChildPeak() as children:
                trainer.save()
            seconds = time.time() - start
            peak = _vm("VmHWM") - before + children.peak
            figures = {
                "rank": rank, "format": "fully_reshardable" if fully else "dp_reshardable",
                "params": params, "shard_bytes": shard, "rank_peak_rise_bytes":
                _vm("VmHWM") - before, "writer_peak_uss_bytes": children.peak,
                "peak_bytes": peak, "ratio": round(peak / shard, 3), "save_s": round(seconds, 2),
            }  # fmt: skip
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, figures)
            if rank == 0:
                for item in gathered:
                    print(json.dumps(item), flush=True)
    finally:
        checkpoints.close()
        shutdown_distributed()
        if rank == 0 and options.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
