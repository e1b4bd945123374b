"""Peak memory of one measured call, for the benchmarks (Linux RSS on CPU, allocator on CUDA).

CPU: writing 5 to ``/proc/self/clear_refs`` resets the peak resident set size (``VmHWM``), so
the peak a call adds over what was resident before it is ``VmHWM - RSS`` read around it. Run
each measurement in a fresh process: freed pages stay resident in the allocator otherwise.
CUDA: ``torch.cuda.reset_peak_memory_stats`` and ``max_memory_allocated``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch


def peak_added_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes ``fn()`` adds over the memory in use when it starts."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    _reset_peak_rss()
    before = _rss_bytes()
    fn()
    return max(_peak_rss_bytes() - before, 0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
