"""Run-time faults: non-finite steps, exit signals and time/iteration limits.

Every decision here is agreed by all ranks through one small all-reduce, so no rank
skips a step or exits alone.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass

import torch

from tst_megatron.settings.reliability import ReliabilityConfig
from tst_megatron.training import exit_signals
from tst_megatron.training.data_parallel import local_grad_shards


def _max_over_ranks(number: int) -> int:
    value = torch.tensor([float(number)])
    if torch.cuda.is_available():
        value = value.cuda()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return int(value.item())


class TrainingStopped(RuntimeError):
    """Training cannot go on (too many consecutive NaN/Inf steps); nothing was saved from it."""


@dataclass(frozen=True)
class StepHealth:
    """What all ranks agree on about one step, from one all-reduce (`check_step`).

    ``loss``: the step's global mean lm loss (sum and count over micro-batches and data
    parallel). ``grads_finite``: no rank's local gradient buffers hold a NaN or Inf.
    ``target_entropy``: TST multi-hot steps, the mean entropy of the positions' target
    distributions over the same positions (``loss - target_entropy`` is the KL form); 0 else.
    """

    loss: float
    grads_finite: bool
    target_entropy: float = 0.0

    @property
    def loss_finite(self) -> bool:
        return math.isfinite(self.loss)

    def is_bad(self, loss_scaling: bool) -> bool:
        """A NaN/Inf step, whose update must be skipped.

        A non-finite loss always is. Non-finite gradients with a finite loss are, except under
        fp16 loss scaling (``loss_scaling``): there they are an overflow of the scaled loss,
        which the optimizer detects itself, skipping the update and lowering the scale.
        """
        return not self.loss_finite or (not self.grads_finite and not loss_scaling)


def check_step(outputs: list[dict], chunks) -> StepHealth:
    """The step's mean loss and whether any gradient is non-finite, on every rank.

    One world all-reduce (SUM) of ``[loss sum, loss count, target entropy sum, non-finite
    flags]`` in float64 (the entropy sum is 0 without a ``"target entropy"`` report).
    Every rank of the last pipeline stage holds a copy of its replica's loss (tensor- and
    context-parallel ranks hold the same sums), so sum and count carry the same multiplicity
    and their ratio is the data-parallel mean; other stages add zeros. The gradient check
    reads ``aminmax`` of each gradient this rank holds (DDP's buffers, or the local shards of
    FSDP's sharded gradients: `data_parallel.local_grad_shards`): a reduction, no
    parameter-sized temporary; NaN propagates through both, an Inf shows in one.
    """
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    loss = torch.zeros(3, dtype=torch.float64, device=device)
    for out in outputs or []:
        loss[:2] += out["lm loss"].detach().to(device=loss.device, dtype=torch.float64)
        if "target entropy" in out:
            loss[2:] += out["target entropy"].detach().to(device=loss.device, dtype=torch.float64)
    extremes = [
        torch.stack(torch.aminmax(grad)).to(torch.float64)
        for chunk in chunks
        for grad in local_grad_shards(chunk)
        if grad.numel()
    ]
    flags = (~torch.isfinite(torch.cat(extremes))).sum() if extremes else loss.new_zeros(())
    total = torch.cat([loss, flags.to(loss).reshape(1)])
    torch.distributed.all_reduce(total)
    loss_sum, count, entropy_sum, non_finite = total.tolist()
    return StepHealth(
        loss=loss_sum / max(count, 1.0),
        grads_finite=non_finite == 0,
        target_entropy=entropy_sum / max(count, 1.0),
    )


class BadStepGuard:
    """Counts consecutive bad (NaN/Inf) steps and decides when training must stop."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0
        self.last_bad_iteration: int | None = None

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

    def __init__(self, reliability: ReliabilityConfig) -> None:
        self.duration_s = (reliability.exit_duration_in_mins or 0) * 60
        self.interval = reliability.exit_interval or 0
        if reliability.exit_signal_handler:
            exit_signals.install(reliability.exit_signum)

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


# Lower-case marks of a collective that failed because another rank hung, died or vanished:
# gloo's timeout and closed/reset sockets, NCCL's timeouts, aborts and remote errors.
PEER_FAILURES = {
    "timed out": "did not complete within --collective-timeout-s {timeout:g}",
    "timeout": "did not complete within --collective-timeout-s {timeout:g}",
    "connection closed by peer": "lost its connection: a peer rank died",
    "connection reset by peer": "lost its connection: a peer rank died",
    "broken pipe": "lost its connection: a peer rank died",
    "ncclremoteerror": "failed: NCCL reports a remote error (a peer rank died)",
    "remote process exited": "failed: a peer rank exited",
    "communicator was aborted": "failed: the NCCL communicator was aborted (a peer rank failed)",
}


def describe_peer_failure(err: BaseException, timeout_s: float, where: str) -> str | None:
    """One line for a collective that failed because of another rank; None for other errors.

    ``where`` says when (e.g. " after iteration 3"); the backend's first line follows.
    """
    text = str(err)
    lower = text.lower()
    for mark, what in PEER_FAILURES.items():
        if mark in lower:
            first = text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__
            return (
                f"a collective {what.format(timeout=timeout_s)}{where}: another rank is hung "
                f"or dead; see its log for the cause ({first})"
            )
    return None
