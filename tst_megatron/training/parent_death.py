"""Workers end with their launcher: a parent-death signal (Linux ``prctl``; standard library).

A rank started by ``torchrun`` (or ``tools/launch.py``, whose torchrun gets the same) asks the
kernel for SIGKILL when its parent exits, however it exits (kill -9 included): otherwise the
ranks of a killed launcher train on unsupervised to the end. A rank started without a
launcher that supervises it (``python pretrain_tst.py``, ``srun`` tasks, whose step daemon
ends them itself) is left alone, so ``nohup`` keeps working. The parent may die between the
fork and the ``prctl``: the parent pid read before is compared with the one after.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
LAUNCHED_BY_TORCHRUN = "TORCHELASTIC_RUN_ID"  # set by torchrun in every worker's environment


def set_parent_death_signal(parent_pid: int, signum: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``signum`` to this process when its parent exits; exit at once if
    the parent (``parent_pid``, read before the call) is already gone. False where ``prctl``
    is unavailable (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent_pid:  # died before the prctl took effect
        os._exit(128 + int(signum))
    return True


def end_with_launcher() -> bool:
    """In a rank at start-up: die with the launcher (torchrun) that started it, if any."""
    if LAUNCHED_BY_TORCHRUN not in os.environ:
        return False
    parent = os.getppid()
    if parent == 1:  # orphaned already
        os._exit(128 + signal.SIGKILL)
    return set_parent_death_signal(parent)
