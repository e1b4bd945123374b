"""Megatron-Core's timers (`megatron.core.timers.Timers`) as Megatron-LM's training loop uses them.

One `Timers` object per run, at ``--timing-log-level``: a timer asked for at a higher level
is a no-op. It is handed to the schedules and `finalize_model_grads` (``config.timers``) and
to the optimizer (``OptimizerConfig.timers``), which start and stop their own timers, as in
Megatron-LM. Each `Timer` synchronises the device at start and stop
(``torch.cuda.synchronize``, a no-op on CPU) and, at level 1, waits for every rank first
unless ``--no-barrier-with-level-1-timing``.

Timers by level (Megatron-LM's names):

- 0: ``save-checkpoint``, ``load-checkpoint`` (with barriers, printed when they happen).
- 1: ``batch-generator`` (reading and laying out the step's micro-batches: this loop builds
  all of them before the schedule, so it is one step-level timer here, level 2 in
  Megatron-LM where it times each micro-batch's ``get_batch``), ``forward-backward``,
  ``all-grads-sync`` (the data-parallel gradient reduction), the other gradient reductions,
  ``params-all-gather``, ``optimizer`` and its ``optimizer-*`` parts.
- 2: ``forward-compute``, ``backward-compute`` and the pipeline send/receive timers.

`StepTimers.report` gathers every rank's times (a collective: all ranks call it together),
`format_report` renders them as Megatron-LM's ``(min, max) time across ranks (ms):`` block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.timers import Timers

from tst_megatron.settings.logs import LoggingConfig

LEVEL_0 = ("save-checkpoint", "load-checkpoint")
LEVEL_1 = (
    "batch-generator",
    "forward-backward",
    "all-grads-sync",
    "non-tensor-parallel-grads-all-reduce",
    "embedding-grads-all-reduce",
    "params-all-gather",
    "optimizer-copy-to-main-grad",
    "optimizer-unscale-and-check-inf",
    "optimizer-clip-main-grad",
    "optimizer-count-zeros",
    "optimizer-inner-step",
    "optimizer-copy-main-to-model-params",
    "optimizer",
)
LEVEL_2 = (
    "forward-compute",
    "backward-compute",
    "forward-recv",
    "forward-send",
    "backward-recv",
    "backward-send",
    "forward-send-forward-recv",
    "forward-send-backward-recv",
    "backward-send-forward-recv",
    "backward-send-backward-recv",
    "forward-backward-send-forward-backward-recv",
)


@dataclass(frozen=True)
class TimerReport:
    """Per-timer times in ms (already divided by the normaliser), ``[world]`` per timer."""

    per_rank_ms: dict[str, list[float]]

    def min_max(self) -> dict[str, tuple[float, float]]:
        """``(min, max)`` over the ranks that ran the timer."""
        out = {}
        for name, times in self.per_rank_ms.items():
            ran = [t for t in times if t > 0.0]
            if ran:
                out[name] = (min(ran), max(ran))
        return out

    def scalars(self) -> dict[str, float]:
        """``{"time_ms/NAME": max over ranks}`` for the metrics record and TensorBoard."""
        return {f"time_ms/{name}": high for name, (_, high) in self.min_max().items()}


class StepTimers:
    """The run's `Timers` plus what Megatron-LM's ``training_log`` does with them."""

    def __init__(self, logging: LoggingConfig) -> None:
        self.level = logging.timing_log_level
        self.option = logging.timing_log_option
        self.barrier = logging.barrier_with_L1_time
        self.timers = Timers(self.level, self.option)

    def __call__(self, name: str, log_level: int | None = None):
        return self.timers(name, log_level=log_level)

    def step_names(self) -> list[str]:
        """The per-step timers of this level, in Megatron-LM's order."""
        names = list(LEVEL_1) if self.level >= 1 else []
        return names + (list(LEVEL_2) if self.level >= 2 else [])

    def report(self, names: list[str], normalizer: float = 1.0) -> TimerReport:
        """Every rank's elapsed time of ``names`` since their last report, then reset them.

        A collective over the world group: every rank calls it with the same ``names``.
        """
        if not names:
            return TimerReport({})
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        mine = torch.tensor(
            [self.timers._timers[name].elapsed(reset=True) if name in self.timers._timers
             else 0.0 for name in names],
            dtype=torch.float64,
            device=device,
        )  # fmt: skip
        world = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(world, mine)
        table = torch.stack(world).cpu() * (1000.0 / normalizer)
        return TimerReport({name: table[:, i].tolist() for i, name in enumerate(names)})

    def format_report(self, report: TimerReport) -> str | None:
        """Megatron-LM's timer block for ``--timing-log-option`` (None when nothing ran)."""
        if self.option == "all":
            lines = [
                f"  {name}:\n"
                + "\n".join(f"     rank {rank:2d}: {t:.2f}" for rank, t in enumerate(times))
                for name, times in report.per_rank_ms.items()
                if any(t > 0 for t in times)
            ]
            return "times across ranks (ms):\n" + "\n".join(lines) if lines else None
        min_max = report.min_max()
        if not min_max:
            return None
        if self.option == "max":
            body = [f"    {(n + ' ').ljust(48, '.')}: {hi:.2f}" for n, (_, hi) in min_max.items()]
            return "max time across ranks (ms):\n" + "\n".join(body)
        body = [
            f"    {(n + ' ').ljust(48, '.')}: ({lo:.2f}, {hi:.2f})"
            for n, (lo, hi) in min_max.items()
        ]
        return "(min, max) time across ranks (ms):\n" + "\n".join(body)


def attach_timers(timers: StepTimers, model_config, optimizer) -> None:
    """Hand the timers to mcore: schedules/``finalize_model_grads`` and the optimizer(s)."""
    model_config.timers = timers.timers
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner.config.timers = timers.timers
        inner.config.barrier_with_L1_time = timers.barrier
