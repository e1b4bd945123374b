"""Phase-1 step time / phase-2 step time for both folds, measured in one run.

One `Trainer` (single rank, mock data) takes training steps of the three layouts in turn:
phase 1 with ``--tst-fold sequence`` (b samples of L latent positions, s*L data tokens
each), phase 1 with ``--tst-fold batch`` (s*b samples of L/s latent positions) and phase 2
(standard next-token steps, b samples of L). Steps are interleaved so drift hits all alike;
the medians are reported as ratios to the phase-2 step, next to the ratio of model FLOPs
(`phase_flops_per_step`: the batch fold's attention costs s times less).

Usage: python benchmarks/tst_fold_step_time.py [--seq-length 2048] [--bag-size 8]
       [--hidden-size 256] [--num-layers 4] [--micro-batch-size 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


def build_trainer(opts: argparse.Namespace):
    import torch

    from tst_megatron.training.loop import Trainer, initialize_distributed
    from tst_megatron.training.run_config import settings_from_flags

    argv = (
        f"--num-layers {opts.num_layers} --hidden-size {opts.hidden_size} "
        f"--num-attention-heads {opts.heads} --seq-length {opts.seq_length} "
        f"--micro-batch-size {opts.micro_batch_size} --train-iters 1000000 --lr 1e-4 "
        f"--mock-data --vocab-size {opts.vocab_size} --swiglu --normalization RMSNorm "
        "--position-embedding-type rope --disable-bias-linear --hidden-dropout 0 "
        "--attention-dropout 0 --eval-iters 0 --log-interval 1000000 "
        f"--tst-bag-size {opts.bag_size} --tst-phase1-iters 1000000"
    ).split()
    if torch.cuda.is_available():
        argv += ["--bf16"]
    else:
        argv += ["--distributed-backend", "gloo"]
    run = settings_from_flags(argv, 1)
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        store = torch.distributed.HashStore()  # one process: no port to collide on
        torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1)
    initialize_distributed(run.parallel, run.batch, run.reliability, run.schedule.seed)
    return run, Trainer(run)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--bag-size", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    opts = parser.parse_args()
    import torch

    from tst_megatron.config import STANDARD_PHASE, PhaseSpec
    from tst_megatron.training.flops import phase_flops_per_step
    from tst_megatron.training.loop import unwrap

    torch.set_num_threads(opts.threads)
    run, trainer = build_trainer(opts)
    s, L = opts.bag_size, opts.seq_length
    specs = {
        "phase 1, sequence fold": PhaseSpec(s, "full", "sequence"),
        "phase 1, batch fold": PhaseSpec(s, "full", "batch"),
        "phase 2": STANDARD_PHASE,
    }
    times: dict[str, list[float]] = {name: [] for name in specs}
    for rep in range(opts.repeats + 1):  # the first round warms up
        for name, spec in specs.items():
            for chunk in trainer.chunks:
                unwrap(chunk).set_phase(spec)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.train_step(spec)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if rep:
                times[name].append(time.perf_counter() - start)
    micro_batch_size = run.batch.micro_batch_size
    flops = {name: phase_flops_per_step(run.model, spec, L, micro_batch_size)
             for name, spec in specs.items()}  # fmt: skip
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else (
        f"{platform.machine()}, {os.cpu_count()} cores, {opts.threads} threads"
    )
    print(f"# {where}, torch {torch.__version__}, transformer impl {run.kernels.transformer_impl}; "
          f"{opts.num_layers} layers, h {opts.hidden_size}, {opts.heads} heads, V "
          f"{opts.vocab_size}, L {L}, s {s}, micro-batch {opts.micro_batch_size}; median of "
          f"{opts.repeats} steps")  # fmt: skip
    print("| step | time / phase-2 step | model FLOPs / phase-2 step | ms | data tokens |")
    print("|---|---|---|---|---|")
    base = statistics.median(times["phase 2"])
    for name, spec in specs.items():
        t = statistics.median(times[name])
        tokens = micro_batch_size * spec.data_tokens_per_sample(L)
        print(f"| {name} | {t / base:.2f}x | {flops[name] / flops['phase 2']:.2f}x | "
              f"{t * 1e3:.0f} | {tokens} |")  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    main()
