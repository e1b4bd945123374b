"""Fused output layer + (multi-hot) cross-entropy vs the unfused path: peak memory and time.

Every figure is a ratio measured in the same run on the same inputs (hidden states
``[tokens, 1, h]``, output weight ``[V, h]``, s targets per position):

  unfused = logits = hidden @ W^T (the output layer's GEMM), then Megatron-Core's
            `vocab_parallel_cross_entropy` (s = 1) or `tst_megatron.loss.multi_hot_cross_entropy`
  fused   = `tst_megatron.loss.fused_output_multi_hot_cross_entropy` (default chunk size)

  time   = forward + backward (gradients of the hidden states and the weight, the loss
           gradient Megatron's schedule feeds back: one value per position), median of
           interleaved repeats, fused / unfused
  memory = peak memory one forward + backward adds over its inputs (CPU: resident set, each
           in a fresh process; CUDA: the caching allocator's peak), fused / unfused

Usage: python benchmarks/fused_output_loss.py [--tokens 4096] [--hidden 1024] [--repeats 3]
Defaults: fp32 on CPU, bf16 on CUDA (--dtype to override).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

VOCABS = (128_256, 32_000)
BAG_SIZES = (1, 6, 16)
IMPLS = ("unfused", "fused")


def _init_single_rank() -> None:
    import torch
    from megatron.core import parallel_state

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    store = torch.distributed.HashStore()  # one process: no port to collide on
    torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)


def _case(vocab: int, s: int, tokens: int, hidden: int, dtype, device):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, 1, hidden, generator=g).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(device, dtype)
    targets = torch.randint(0, vocab, (1, tokens, s), generator=g).to(device)
    return x, w, targets if s > 1 else targets[..., 0]


def _loss(impl: str, x, w, targets):
    import torch
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from tst_megatron.loss import fused_output_multi_hot_cross_entropy, multi_hot_cross_entropy

    if impl == "fused":
        return fused_output_multi_hot_cross_entropy(x, w, targets)
    logits = torch.matmul(x, w.t())  # [tokens, 1, V], as the output layer computes it
    if targets.dim() == 2:
        return vocab_parallel_cross_entropy(logits, targets.t()).t()
    return multi_hot_cross_entropy(logits, targets)


def _fwd_bwd(impl: str, x, w, targets) -> None:
    loss = _loss(impl, x, w, targets)
    loss.mean().backward()  # one gradient value per position, as Megatron's schedule feeds
    x.grad = w.grad = None


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def time_all(vocab, tokens, hidden, repeats, dtype, device) -> dict[tuple[str, int], float]:
    """Median fwd+bwd seconds of every (impl, s), interleaved so drift hits all alike."""
    cases = {}
    for s in BAG_SIZES:
        x, w, targets = _case(vocab, s, tokens, hidden, dtype, device)
        cases[s] = (x.requires_grad_(), w.requires_grad_(), targets)
    times: dict[tuple[str, int], list[float]] = {(i, s): [] for s in BAG_SIZES for i in IMPLS}
    for rep in range(repeats + 1):  # the first round warms up (allocator, kernels)
        for impl, s in times:
            _sync(device)
            start = time.perf_counter()
            _fwd_bwd(impl, *cases[s])
            _sync(device)
            if rep:
                times[(impl, s)].append(time.perf_counter() - start)
    return {run: statistics.median(t) for run, t in times.items()}


def peak_memory_one(impl, vocab, s, tokens, hidden, dtype, device) -> int:
    """Peak bytes one fwd+bwd adds over its inputs (run in a fresh process on CPU)."""
    from peak_memory import peak_added_bytes

    x, w, targets = _case(vocab, s, tokens, hidden, dtype, device)
    x.requires_grad_()
    w.requires_grad_()
    if device.type == "cuda":
        _fwd_bwd(impl, x, w, targets)  # warm up: cuBLAS workspaces are not the loss's
    return peak_added_bytes(lambda: _fwd_bwd(impl, x, w, targets), device)


def peak_memory(impl, vocab, s, args, dtype, device) -> int:
    if device.type == "cuda":
        return peak_memory_one(impl, vocab, s, args.tokens, args.hidden, dtype, device)
    cmd = [sys.executable, __file__, "--one", impl, str(vocab), str(s),
           "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--dtype", args.dtype,
           "--threads", str(args.threads)]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096, help="L*b positions")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    parser.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS))
    parser.add_argument("--one", nargs=3, metavar=("IMPL", "VOCAB", "S"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.one:
        impl, vocab, s = args.one[0], int(args.one[1]), int(args.one[2])
        _init_single_rank()
        print(peak_memory_one(impl, vocab, s, args.tokens, args.hidden, dtype, device))
        return

    _init_single_rank()
    from tst_megatron.loss import default_chunk_tokens

    where = torch.cuda.get_device_name() if device.type == "cuda" else (
        f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads"
    )
    print(f"# {where}, torch {torch.__version__}, {args.dtype}; hidden [{args.tokens}, 1, "
          f"{args.hidden}], chunk {default_chunk_tokens(args.hidden)} tokens; median of "
          f"{args.repeats}")  # fmt: skip
    print("| vocab | s | time fused / unfused | peak mem fused / unfused | fused ms | "
          "unfused ms | fused MiB | unfused MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for vocab in args.vocabs:
        times = time_all(vocab, args.tokens, args.hidden, args.repeats, dtype, device)
        for s in BAG_SIZES:
            mem = {impl: peak_memory(impl, vocab, s, args, dtype, device) for impl in IMPLS}
            t = {impl: times[(impl, s)] for impl in IMPLS}
            print(f"| {vocab} | {s} | {t['fused'] / t['unfused']:.2f}x | "
                  f"{mem['fused'] / mem['unfused']:.2f}x | {t['fused'] * 1e3:.0f} | "
                  f"{t['unfused'] * 1e3:.0f} | {mem['fused'] / 2**20:.0f} | "
                  f"{mem['unfused'] / 2**20:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [os.path.join(here, ".."), here]
    main()
