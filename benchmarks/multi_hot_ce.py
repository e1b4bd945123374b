"""Fused multi-hot CE vs one standard Megatron cross-entropy: time and peak memory.

Every figure is a ratio measured in the same run on the same logits:
  time   = forward+backward of the loss / forward+backward of one
           `megatron.core.tensor_parallel.vocab_parallel_cross_entropy`
  memory = peak resident memory added by the loss (fresh process per measurement)
           / that of the standard cross-entropy

Usage: python benchmarks/multi_hot_ce.py [--tokens 1024] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

VOCABS = (32_000, 128_256)
BAG_SIZES = (1, 4, 16)


def _init_single_rank() -> None:
    import torch
    from megatron.core import parallel_state

    store = torch.distributed.HashStore()  # one process: no port to collide on
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)


def _loss_fn(impl: str, s: int):
    import torch
    import torch.nn.functional as F
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from tst_megatron.loss import multi_hot_cross_entropy

    if impl == "standard":
        return lambda logits, targets: vocab_parallel_cross_entropy(logits, targets[..., 0].t())
    if impl == "fused":
        return multi_hot_cross_entropy

    def naive(logits, targets):
        flat = logits.transpose(0, 1).reshape(-1, logits.shape[-1])
        losses = [
            F.cross_entropy(flat, targets[..., k].reshape(-1), reduction="none") for k in range(s)
        ]
        return torch.stack(losses, -1).mean(-1)

    return naive


def _case(vocab: int, s: int, tokens: int):
    import torch

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(tokens, 1, vocab, generator=g)
    return logits, torch.randint(0, vocab, (1, tokens, s), generator=g)


def _fwd_bwd(fn, logits_buffer, base_logits, targets) -> float:
    """Seconds of one loss forward+backward. The logits are first copied into a reused
    buffer, outside the timed region (both losses, like Megatron's, overwrite fp32 logits in
    place, so every call needs fresh ones)."""
    leaf = logits_buffer.copy_(base_logits).requires_grad_()
    start = time.perf_counter()
    fn(leaf, targets).sum().backward()
    seconds = time.perf_counter() - start
    leaf.grad = None
    logits_buffer.requires_grad_(False)
    return seconds


def time_all(vocab: int, tokens: int, repeats: int) -> dict[tuple[str, int], float]:
    """Median fwd+bwd seconds of every (impl, s), interleaved so drift hits all alike."""
    import torch

    cases = {s: _case(vocab, s, tokens) for s in BAG_SIZES}
    buffer = torch.empty_like(cases[1][0])
    runs = [("standard", 1)] + [(impl, s) for s in BAG_SIZES for impl in ("fused", "naive")]
    times: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
    for rep in range(repeats):
        for impl, s in runs:
            if impl == "naive" and rep >= max(1, repeats // 3):
                continue  # the naive loss is slow; fewer repeats suffice to show the gap
            fn = _loss_fn(impl, s)
            base, targets = cases[s]
            times[(impl, s)].append(_fwd_bwd(fn, buffer, base, targets))
    return {run: statistics.median(t) for run, t in times.items()}


def peak_memory_one(impl: str, vocab: int, s: int, tokens: int) -> int:
    """Runs in a fresh process: peak resident bytes one fwd+bwd adds over its inputs."""
    import torch
    from peak_memory import peak_added_bytes

    _init_single_rank()
    fn = _loss_fn(impl, s)
    base, targets = _case(vocab, s, tokens)
    buffer = torch.empty_like(base).copy_(base)
    return peak_added_bytes(lambda: _fwd_bwd(fn, buffer, base, targets), torch.device("cpu"))


def peak_memory_isolated(impl: str, vocab: int, s: int, tokens: int) -> int:
    cmd = [sys.executable, __file__, "--one", impl, str(vocab), str(s), "--tokens", str(tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=1024, help="L*b logit rows")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=3, metavar=("IMPL", "VOCAB", "S"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        impl, vocab, s = args.one[0], int(args.one[1]), int(args.one[2])
        print(peak_memory_one(impl, vocab, s, args.tokens))
        return

    _init_single_rank()
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads; logits [{args.tokens}, 1, V] fp32; median of "
          f"{args.repeats} (naive: {max(1, args.repeats // 3)})")
    header = "| vocab | s | loss | time / CE | peak mem / CE | loss ms | CE ms |"
    print(header)
    print("|---|---|---|---|---|---|---|")
    for vocab in VOCABS:
        times = time_all(vocab, args.tokens, args.repeats)
        ce_time = times[("standard", 1)]
        ce_mem = peak_memory_isolated("standard", vocab, 1, args.tokens)
        for s in BAG_SIZES:
            for impl in ("fused", "naive"):
                mem = peak_memory_isolated(impl, vocab, s, args.tokens)
                t = times[(impl, s)]
                print(f"| {vocab} | {s} | {impl} | {t / ce_time:.2f}x | {mem / ce_mem:.2f}x "
                      f"| {t * 1e3:.0f} | {ce_time * 1e3:.0f} |", flush=True)


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [os.path.join(here, ".."), here]
    main()
