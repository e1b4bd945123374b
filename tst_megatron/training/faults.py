"""Run-time faults: non-finite steps, exit signals and time/iteration limits.

Every decision here is agreed by all ranks through one small all-reduce, so no rank
skips a step or exits alone.
"""

from __future__ import annotations

import signal
import time
from argparse import Namespace

import torch

from tst_megatron.training import exit_signals


def _max_over_ranks(number: int) -> int:
    value = torch.tensor([float(number)])
    if torch.cuda.is_available():
        value = value.cuda()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return int(value.item())


def _any_rank(flag: bool) -> bool:
    return _max_over_ranks(int(flag)) > 0


class TrainingStopped(RuntimeError):
    """Training cannot go on (too many consecutive NaN/Inf steps); nothing was saved from it."""


class BadStepGuard:
    """Detects NaN/Inf gradients on any rank; counts consecutive bad steps."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0
        self.last_bad_iteration: int | None = None

    def grads_not_finite(self, chunks) -> bool:
        """True on every rank when any rank's local gradients hold a NaN or Inf."""
        bad = False
        for chunk in chunks:
            for buffer in [*chunk.buffers, *chunk.expert_parallel_buffers]:
                if not torch.isfinite(buffer.grad_data).all():
                    bad = True
        return _any_rank(bad)

    def record(self, bad: bool, iteration: int) -> None:
        if bad:
            self.consecutive += 1
            self.total += 1
            self.last_bad_iteration = iteration
        else:
            self.consecutive = 0

    def should_stop(self) -> bool:
        return self.max_consecutive > 0 and self.consecutive >= self.max_consecutive

    def stop_message(self) -> str:
        return (
            f"stopping: {self.consecutive} consecutive iterations with a NaN/Inf loss or "
            f"gradient, the last at iteration {self.last_bad_iteration} (limit "
            f"--max-bad-steps {self.max_consecutive}); their updates were skipped and no "
            "checkpoint was written from them: resume from the last checkpoint, e.g. with a "
            "lower --lr"
        )


_DURATION, _INTERVAL = 1000, 1001  # exit codes agreed over ranks besides signal numbers


class ExitRequests:
    """Exit signals (SIGTERM/SIGUSR1, Slurm's warning), --exit-duration-in-mins, --exit-interval.

    The signal is recorded by `tst_megatron.training.exit_signals` (installed by
    ``pretrain_tst.py`` before any heavy work, so a signal during start-up is kept too).
    """

    def __init__(self, args: Namespace) -> None:
        self.duration_s = (args.exit_duration_in_mins or 0) * 60
        self.interval = args.exit_interval or 0
        if args.exit_signal_handler:
            exit_signals.install(args.exit_signal)

    @property
    def received(self) -> int:
        """The exit signal's number once it arrived in this process, else 0."""
        return exit_signals.received()

    def signal_before_start(self) -> str | None:
        """The reason to exit before the first step: an exit signal received during start-up
        by any rank (agreed by all ranks)."""
        code = _max_over_ranks(self.received)
        return f"received {signal.Signals(code).name} during start-up" if code else None

    def check(self, iteration: int, start_time: float) -> str | None:
        """The reason to save and exit now, agreed by all ranks (even those the signal missed)."""
        code = self.received  # signal numbers are < _DURATION
        if not code and self.duration_s and time.time() - start_time > self.duration_s:
            code = _DURATION
        elif not code and self.interval and iteration % self.interval == 0:
            code = _INTERVAL
        code = _max_over_ranks(code)
        if code == _DURATION:
            return f"--exit-duration-in-mins {self.duration_s / 60:g} reached"
        if code == _INTERVAL:
            return f"--exit-interval {self.interval} reached"
        return f"received {signal.Signals(code).name}" if code else None
