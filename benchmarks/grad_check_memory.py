"""Peak memory and collectives of the per-step NaN/Inf gradient check, before and after.

Before (up to commit d73e83d): ``torch.isfinite(buffer.grad_data).all()`` per gradient buffer
(a bool temporary of one byte per parameter), one world all-reduce for the flag, and the loss
reduced separately (a data-parallel all-reduce and a world broadcast). After:
`tst_megatron.training.faults.check_step`, ``aminmax`` per buffer (no parameter-sized
temporary) and one world all-reduce carrying the loss sum, the count and the flag.

Each variant runs in a fresh process on a gradient buffer of ``--numel`` elements (fp32 and
bf16, the DDP buffer dtypes of bf16 and fp16 training) and reports the peak memory the check
adds on top of the buffer, as a fraction of the buffer's bytes: ``max_memory_allocated`` on
CUDA, the growth of the peak resident set size on CPU. It also counts the collectives.

    python benchmarks/grad_check_memory.py [--numel 134217728]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tst_megatron.training.faults import check_step  # noqa: E402


def _before(outputs, chunks) -> tuple[float, bool]:
    """The check and loss reduction as they were (faults.py / loop.py before this change)."""
    bad = False
    for chunk in chunks:
        for buffer in [*chunk.buffers, *chunk.expert_parallel_buffers]:
            if not torch.isfinite(buffer.grad_data).all():
                bad = True
    flag = torch.tensor([float(bad)], device=_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    total = torch.zeros(2)
    for out in outputs:
        total += out["lm loss"].detach().float().cpu()
    total = total.to(_device())
    dist.all_reduce(total)  # data-parallel group in the loop
    dist.broadcast(total, src=dist.get_world_size() - 1)
    return (total[0] / total[1].clamp(min=1)).item(), flag.item() == 0


def _after(outputs, chunks) -> tuple[float, bool]:
    health = check_step(outputs, chunks)
    return health.loss, health.grads_finite


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _peak_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(variant: str, numel: int, dtype_name: str) -> dict:
    """One measurement in this (fresh) process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    counts = {"all_reduce": 0, "broadcast": 0}
    for name in counts:
        original = getattr(dist, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    dtype = getattr(torch, dtype_name)
    grad = torch.empty(numel, dtype=dtype, device=_device())
    grad.normal_()  # touch every page
    grad[numel // 3] = float("inf")
    buffers = [SimpleNamespace(grad_data=grad)]
    chunks = [SimpleNamespace(buffers=buffers, expert_parallel_buffers=[])]
    outputs = [{"lm loss": torch.tensor([12.0, 4.0], device=_device())}]
    check = _before if variant == "before" else _after
    baseline = _peak_bytes()
    loss, finite = check(outputs, chunks)
    extra = _peak_bytes() - baseline
    buffer_bytes = numel * grad.element_size()
    return {
        "variant": variant,
        "dtype": dtype_name,
        "buffer_bytes": buffer_bytes,
        "extra_peak_bytes": extra,
        "extra_over_buffer": extra / buffer_bytes,
        "collectives": sum(counts.values()),
        "loss": loss,
        "inf_found": not finite,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=128 * 2**20)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "DTYPE"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        print(json.dumps(child(opts.child[0], opts.numel, opts.child[1])))
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (peak RSS)"
    print(f"gradient buffer: {opts.numel:,} elements; device: {device}")
    print(f"{'dtype':9} {'variant':7} {'extra peak':>12} {'/ buffer':>9} {'collectives':>11}")
    rows = {}
    for dtype in ("float32", "bfloat16"):
        for variant in ("before", "after"):
            cmd = [sys.executable, __file__, "--numel", str(opts.numel), "--child", variant, dtype]
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            assert row["inf_found"] and row["loss"] == 3.0, row
            rows[dtype, variant] = row
            print(
                f"{dtype:9} {variant:7} {row['extra_peak_bytes'] / 2**20:9.1f} MiB "
                f"{row['extra_over_buffer']:9.3f} {row['collectives']:11d}"
            )
    for dtype in ("float32", "bfloat16"):
        before, after = rows[dtype, "before"], rows[dtype, "after"]
        saved = (before["extra_peak_bytes"] - after["extra_peak_bytes"]) / 2**20
        print(
            f"{dtype}: extra peak after/before = "
            f"{after['extra_peak_bytes'] / max(before['extra_peak_bytes'], 1):.3f} "
            f"({saved:.0f} MiB less); collectives {before['collectives']} -> "
            f"{after['collectives']}"
        )


if __name__ == "__main__":
    main()
