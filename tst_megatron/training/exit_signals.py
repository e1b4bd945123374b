"""Which processes of a job react to the exit signal, and how (standard library only).

A cluster delivers a preemption or time-limit signal to more than the trainer's main
process: ``torchrun`` sends it to each worker's whole process group, and Slurm (``scancel
--signal``, ``srun`` forwarding, preemption) to every process of the job step. Three rules
keep the exit save alive:

* **The trainer records the signal from its first moments** (`install_from_argv`, called by
  ``pretrain_tst.py`` before the heavy imports; `install` again once the arguments are
  parsed): a signal that arrives while the tasks are still starting is recorded, not fatal,
  and the loop exits cleanly before its first step.
* **Checkpoint helper processes ignore exit signals** (`shield_helper_process`, the
  initializer of Megatron-Core's checkpoint-writer manager process, see
  `tst_megatron.training.checkpoint_strategies`, and the first call of the persistent
  checkpoint worker, `tst_megatron.training.checkpoint_worker`) and exit when their parent
  rank is gone.
* **A launcher may shield itself** and forward the signal to the workers
  (``tools/launch.py``); it lists the signals it set to "ignored" in `SHIELDED_ENV`, and the
  workers restore their default action (`restore_shielded_signals`) before installing the
  exit handler.

This module must stay importable without torch: the helper process imports it at start.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

EXIT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
# Signals a cluster or launcher sends to stop or warn a job; helper processes ignore them.
HELPER_IGNORES = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
SHIELDED_ENV = "TST_LAUNCHER_SHIELDED_SIGNALS"

_received = 0  # the signal number once one arrived (0: none)
_installed: signal.Signals | None = None
_previous_handler: Callable[[int, FrameType | None], Any] | int | None = signal.SIG_DFL


def _record(signum: int, frame) -> None:
    global _received
    _received = signum


def received() -> int:
    """The exit signal's number if it arrived in this process, else 0."""
    return _received


def install(signum: signal.Signals) -> None:
    """Record ``signum`` from now on instead of dying of it (replaces an earlier install)."""
    global _installed, _previous_handler
    if _installed == signum:
        return
    if _installed is not None:
        signal.signal(_installed, _previous_handler)
    _previous_handler = signal.signal(signum, _record)
    _installed = signum


def uninstall() -> None:
    """Undo `install` and forget a received signal (for tests running in one process)."""
    global _installed, _received
    if _installed is not None:
        signal.signal(_installed, _previous_handler)
    _installed, _received = None, 0


def requested_in(argv: Sequence[str]) -> signal.Signals | None:
    """The exit signal that ``--exit-signal-handler [--exit-signal NAME]`` in ``argv`` asks for.

    A cheap scan, before argparse and the heavy imports; None without the flag or with a
    name that is not an exit signal (argparse reports that one later).
    """
    if "--exit-signal-handler" not in argv:
        return None
    name = "SIGTERM"
    for i, arg in enumerate(argv):
        if arg == "--exit-signal" and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--exit-signal="):
            name = arg.partition("=")[2]
    return signal.Signals[name] if name in EXIT_SIGNALS else None


def install_from_argv(argv: Sequence[str]) -> None:
    """`restore_shielded_signals`, then `install` the exit signal ``argv`` asks for, if any."""
    restore_shielded_signals()
    signum = requested_in(argv)
    if signum is not None:
        install(signum)


def restore_shielded_signals() -> None:
    """Give back the default action to the signals a shielding launcher set to "ignored".

    Ignored dispositions survive ``exec``: without this a worker started under
    ``tools/launch.py`` would ignore SIGTERM even without ``--exit-signal-handler``.
    """
    for name in filter(None, os.environ.get(SHIELDED_ENV, "").split(",")):
        signum = signal.Signals[name.strip()]
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)


def shield_helper_process(parent_pid: int) -> None:
    """Initializer of a helper process: ignore the exit signals, exit once the parent is gone.

    A signal sent to the whole process group (``torchrun``) or to every process of a Slurm
    step then leaves the helper serving the rank's exit save; a SIGKILLed rank does not
    leave it behind (checked every second).
    """
    for signum in HELPER_IGNORES:
        signal.signal(signum, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)
