"""Fault injection for the reliability tests (``tests/test_reliability.py``).

**Inert unless the environment variable ``TST_FAULT_INJECT`` is set**: every hook below then
returns at once and changes nothing, so production runs behave exactly as without this
module. The variable holds one or more faults separated by ``;``:

``kill_during_save:ITER[:POINT]``
    Rank 0 kills itself with SIGKILL while saving the checkpoint of iteration ITER, at POINT
    of the publication (`PUBLISH_POINTS`, in order; default ``staged``): ``staged`` every
    shard is written to ``iter_XXXXXXX.tmp``; ``recorded`` its ``tst_checkpoint.json`` is
    written there; ``moved_aside`` an existing unpublished or damaged ``iter_XXXXXXX`` was
    renamed to ``iter_XXXXXXX.replaced`` (only when one exists); ``renamed`` the staging
    directory is ``iter_XXXXXXX``; ``tracked`` the tracker names ITER (older directories not
    yet removed).
``nan_loss:ITER[,ITER...]``
    The loss of these iterations (and so every gradient) is NaN on every rank.
``overflow:ITER[,ITER...]``
    The loss of these iterations stays finite but every gradient is Inf/NaN, as when an fp16
    loss scale is too large: fp16 runs skip the step and lower the scale, others count a bad
    step.
``hang_rank:RANK:ITER``
    Rank RANK sleeps forever before iteration ITER starts (a hung or dead rank).
``signal:RANK:ITER:NAME``
    Rank RANK sends itself signal NAME (e.g. ``SIGTERM``) before iteration ITER starts.
``tamper_during_save:ITER``
    Rank 0 overwrites 64 bytes in the middle of the shard file ``__0_0.distcp`` of iteration
    ITER after every rank wrote it and before publication (another writer mixing in).
``slow_steps:SECONDS``
    Every rank sleeps SECONDS before each iteration (a slow model: a signal sent from outside
    by a test then lands mid-run, and the run's losses are unchanged).

Iterations count from 1, as in the log (``iteration 3/8`` is ITER 3). The hooks are called
from fixed points in `tst_megatron.training.loop` and `tst_megatron.training.checkpointing`.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from functools import cache

import torch

ENV = "TST_FAULT_INJECT"
PUBLISH_POINTS = ("staged", "recorded", "moved_aside", "renamed", "tracked")


@cache
def _faults() -> dict[str, list[tuple]]:
    """``TST_FAULT_INJECT`` parsed once: kind -> list of argument tuples (empty when unset)."""
    faults: dict[str, list[tuple]] = {}
    for item in filter(None, (part.strip() for part in os.environ.get(ENV, "").split(";"))):
        faults.setdefault(item.partition(":")[0], []).append(_parse(item))
    return faults


def _parse(item: str) -> tuple:
    kind, _, rest = item.partition(":")
    fields = rest.split(":")
    try:
        if kind in ("nan_loss", "overflow") and len(fields) == 1:
            return tuple(int(i) for i in fields[0].split(","))
        if kind == "hang_rank" and len(fields) == 2:
            return (int(fields[0]), int(fields[1]))
        if kind == "signal" and len(fields) == 3 and fields[2] in signal.Signals.__members__:
            return (int(fields[0]), int(fields[1]), fields[2])
        if kind == "kill_during_save" and len(fields) in (1, 2):
            point = fields[1] if len(fields) == 2 else PUBLISH_POINTS[0]
            if point in PUBLISH_POINTS:
                return (int(fields[0]), point)
        if kind == "tamper_during_save" and len(fields) == 1:
            return (int(fields[0]),)
        if kind == "slow_steps" and len(fields) == 1:
            return (float(fields[0]),)
    except ValueError:
        pass
    raise ValueError(f"{ENV}: cannot parse fault {item!r} (see {__name__})")


def before_iteration(iteration: int) -> None:
    """Hook at the start of iteration ``iteration``: ``hang_rank``, ``signal``, ``slow_steps``."""
    faults = _faults()
    if not faults:
        return
    for (seconds,) in faults.get("slow_steps", []):
        time.sleep(seconds)
    rank = torch.distributed.get_rank()
    for target, at in faults.get("hang_rank", []):
        if (target, at) == (rank, iteration):
            print(f"[fault injection] rank {rank} hangs at iteration {iteration}", flush=True)
            while True:
                time.sleep(3600)
    for target, at, name in faults.get("signal", []):
        if (target, at) == (rank, iteration):
            print(f"[fault injection] rank {rank} sends itself {name}", flush=True)
            os.kill(os.getpid(), signal.Signals[name])


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by +Inf."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


def forward_step(step: Callable, iteration: int) -> Callable:
    """Hook around the forward step of iteration ``iteration``: ``nan_loss``, ``overflow``.

    Returns ``step`` itself unless the iteration is listed; else a step whose output (the
    loss on the last pipeline stage, the activations elsewhere) is multiplied by NaN
    (``nan_loss``) or passes an infinite gradient back (``overflow``).
    """
    faults = _faults()
    nan = any(iteration in its for its in faults.get("nan_loss", []))
    overflow = any(iteration in its for its in faults.get("overflow", []))
    if not (nan or overflow):
        return step

    def faulty_step(data_iterator, model):
        output, loss_func = step(data_iterator, model)
        if nan:
            return output * float("nan"), loss_func
        return _InfiniteGradient.apply(output), loss_func

    return faulty_step


def during_save(iteration: int, staging: str) -> None:
    """Hook after the shards of ``iteration`` are staged in ``staging``, before publication."""
    faults = _faults()
    if not faults or torch.distributed.get_rank() != 0:
        return
    if (iteration,) in faults.get("tamper_during_save", []):
        shard = os.path.join(staging, "__0_0.distcp")
        print(f"[fault injection] rank 0 overwrites part of {shard}", flush=True)
        with open(shard, "r+b") as f:
            f.seek(os.path.getsize(shard) // 2)
            f.write(b"\x5a" * 64)
    publishing(iteration, PUBLISH_POINTS[0])


def publishing(iteration: int, point: str) -> None:
    """Hook at ``point`` (one of `PUBLISH_POINTS`) of rank 0's publication of ``iteration``."""
    faults = _faults()
    if faults and (iteration, point) in faults.get("kill_during_save", []):
        print(
            f"[fault injection] rank 0 killed while saving iteration {iteration} ({point})",
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGKILL)
