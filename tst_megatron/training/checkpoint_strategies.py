"""How Megatron-Core writes a checkpoint: its save/load strategies and its writer processes.

`shield_checkpoint_writer` replaces the one piece of Megatron-Core's save path that an exit
signal killed (see the function).
"""

from __future__ import annotations

import os
from multiprocessing.managers import SyncManager

import torch.multiprocessing as mp
from megatron.core.dist_checkpointing.strategies import filesystem_async

from tst_megatron.training import exit_signals

_manager: SyncManager | None = None


def shield_checkpoint_writer() -> None:
    """Start Megatron-Core's checkpoint-writer results queue in a process that survives the
    exit signal.

    ``megatron/core/dist_checkpointing/strategies/filesystem_async.py``
    (`_get_write_results_queue`) creates, at a rank's first save, a spawn-mode
    ``multiprocessing`` manager whose queue carries every later save's write results. That
    manager is a child of the rank, in its process group, with default signal actions: the
    SIGTERM that ``torchrun`` sends to each worker's process group, or the SIGUSR1 Slurm sends
    to every process of the step, kills it, and the exit save that the signal asked for dies
    with ``BrokenPipeError`` in ``write_preloaded_data_multiproc``. We start the same manager
    ourselves, with `exit_signals.shield_helper_process` as its initializer (exit signals
    ignored, exits when the rank is gone), and hand its queue to Megatron-Core. Idempotent.
    """
    global _manager
    if filesystem_async._results_queue is not None:
        return
    _manager = SyncManager(ctx=mp.get_context("spawn"))
    _manager.start(initializer=exit_signals.shield_helper_process, initargs=(os.getpid(),))
    filesystem_async._results_queue = _manager.Queue()
