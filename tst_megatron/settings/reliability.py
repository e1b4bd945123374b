"""Reliability: exit signals and limits, bad-step tolerance, hang detection, manual GC."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Literal

from tst_megatron.settings.checks import SettingsError, check_non_negative, check_positive

ExitSignal = Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ReliabilityConfig:
    """``exit_signal_handler``: save and exit on ``exit_signal``; also on
    ``exit_duration_in_mins`` of wall time or at multiples of ``exit_interval`` (None = no
    limit). ``max_bad_steps`` consecutive NaN/Inf steps stop the run. ``collective_timeout_s``:
    the process-group timeout (default ``--distributed-timeout-minutes`` x 60).

    ``manual_gc``: Python's collector off, collecting every ``manual_gc_interval`` steps (0 =
    never between steps) and around evaluations (``manual_gc_eval``), so that ranks pause
    together instead of stalling each other's collectives.
    """

    exit_signal_handler: bool = False
    exit_signal: ExitSignal = "SIGTERM"
    exit_duration_in_mins: int | None = None
    exit_interval: int | None = None
    max_bad_steps: int = 3
    collective_timeout_s: float = 600.0
    manual_gc: bool = False
    manual_gc_interval: int = 0
    manual_gc_eval: bool = True

    def __post_init__(self) -> None:
        check_positive("--max-bad-steps", self.max_bad_steps)
        check_positive("--exit-duration-in-mins", self.exit_duration_in_mins)
        check_positive("--exit-interval", self.exit_interval)
        check_non_negative("--manual-gc-interval", self.manual_gc_interval)
        if self.collective_timeout_s <= 0:
            raise SettingsError(
                f"--collective-timeout-s must be > 0, got {self.collective_timeout_s}"
            )
        if not self.manual_gc and (self.manual_gc_interval or not self.manual_gc_eval):
            raise SettingsError("--manual-gc-interval/--no-manual-gc-eval need --manual-gc")

    @property
    def exit_signum(self) -> signal.Signals:
        """``exit_signal`` as a signal number."""
        return signal.Signals[self.exit_signal]
