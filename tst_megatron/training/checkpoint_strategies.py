"""How Megatron-Core writes and reads a checkpoint: strategies, optimizer format, async saves.

As Megatron-LM's ``megatron/training/checkpointing.py`` does:

* **Optimizer format** (`optimizer_format`): ``dp_reshardable`` by default (each data-parallel
  rank saves and loads its own distributed-optimizer shard: no gather, no exchange; it
  reshards across data parallel only), ``fully_reshardable`` with ``--ckpt-fully-reshardable``
  (Megatron-LM: ``--dist-ckpt-optim-fully-reshardable``; it gathers every optimizer buffer
  onto each data-parallel rank at save, and reshards to any layout).
* **Fully parallel save/load** (`save_strategy`, `load_strategy`): Megatron-Core's
  `FullyParallelSaveStrategyWrapper` / `FullyParallelLoadStrategyWrapper` over the
  data-parallel (x context-parallel) group split the writing and reading of replicated
  tensors evenly over its ranks (``--no-ckpt-fully-parallel-save`` /
  ``--no-ckpt-fully-parallel-load`` turn them off).
* **Async saves** (`AsyncSaves`, ``--async-save --use-persistent-ckpt-worker``): Megatron-Core's
  `AsyncCallsQueue`; the shards are written by the rank's persistent checkpoint worker
  (`checkpoint_worker`) while training goes on, and the checkpoint is published by a finalize
  function once every rank's write is done.

Two Megatron-Core behaviours are replaced, each for a failure it caused:
`shield_checkpoint_writer` (its writer-results manager died of exit signals) and
`deferred_rank0_write_errors` (a failed rank-0-only write left the other ranks waiting).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from multiprocessing.managers import SyncManager

import torch
import torch.multiprocessing as mp
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)

from tst_megatron.mcore_compat import rank0_checkpoint_writers
from tst_megatron.training import exit_signals
from tst_megatron.training.checkpoint_files import Digest
from tst_megatron.training.checkpoint_worker import PersistentCheckpointWorker

DP_RESHARDABLE = "dp_reshardable"
FULLY_RESHARDABLE = "fully_reshardable"

# Megatron-Core keeps its writer-results queue in a module global for the process's life; this
# is the manager that serves it (`shield_checkpoint_writer`), kept as long as the queue is.
_manager: SyncManager | None = None


def optimizer_format(fully_reshardable: bool) -> str:
    """The distributed-optimizer checkpoint format a run saves in (``--ckpt-fully-reshardable``
    or not)."""
    return FULLY_RESHARDABLE if fully_reshardable else DP_RESHARDABLE


def sharded_state_dict_metadata(sharding_type: str) -> dict:
    """The ``metadata`` argument of the optimizer's ``sharded_state_dict``."""
    return {"distrib_optim_sharding_type": sharding_type}


def save_strategy(group, parallel: bool):
    """torch_dist saving, fully parallel over the data-parallel ``group`` (with context
    parallelism) unless turned off (``parallel``: ``--ckpt-fully-parallel-save``).

    The `Checkpointer` builds it once per parallel state and keeps it for later saves, as
    Megatron-LM keeps it in its ``checkpointing_context``.
    """
    strategy = get_default_save_sharded_strategy("torch_dist")
    return FullyParallelSaveStrategyWrapper(strategy, group) if parallel else strategy


def load_strategy(path: str, parallel: bool):
    """The checkpoint's load strategy, fully parallel over the data-parallel group unless
    turned off (``parallel``: ``--ckpt-fully-parallel-load``)."""
    strategy = get_default_load_sharded_strategy(path)
    if parallel:
        strategy = FullyParallelLoadStrategyWrapper(
            strategy, parallel_state.get_data_parallel_group(with_context_parallel=True)
        )
    return strategy


class _WorkerCallsQueue(AsyncCallsQueue):
    """Megatron-Core's queue of async calls, every call made by one persistent worker."""

    def __init__(self, worker: PersistentCheckpointWorker) -> None:
        super().__init__()
        self._worker = worker

    def _get_async_caller(self) -> PersistentCheckpointWorker:
        return self._worker


class AsyncSaves:
    """``--async-save`` (with ``--use-persistent-ckpt-worker``, as Megatron-LM requires):
    Megatron-Core's `AsyncCallsQueue`, its writes made by this rank's persistent checkpoint
    worker (`checkpoint_worker.PersistentCheckpointWorker`)."""

    def __init__(self) -> None:
        self.worker = PersistentCheckpointWorker()
        self.queue = _WorkerCallsQueue(self.worker)

    def schedule(self, request: AsyncRequest) -> None:
        self.queue.schedule_async_request(request)

    def pending(self) -> int:
        return self.queue.get_num_unfinalized_calls()

    def finalize(self, blocking: bool) -> None:
        """Run the finalize functions of the saves every rank finished (all when blocking).

        Must be called on all ranks (it agrees through an all-reduce while saves are pending).
        """
        if self.pending():
            self.queue.maybe_finalize_async_calls(blocking=blocking)

    def written_digests(self) -> dict[str, Digest]:
        """The digests of the files the worker wrote since the last call."""
        return self.worker.written_digests()

    def close(self) -> None:
        """Stop the worker: cleanly when every save was finalized, else at once (a save in
        flight stays unpublished, as when the rank is killed)."""
        self.worker.close(abort=bool(self.pending()))


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

    Start method: Megatron-Core spawns, because a rank that has initialised CUDA must not
    fork a long-lived child. A spawned server re-imports torch to unpickle the write results
    (about 3 s of CPU per rank at its first save); a rank that has not initialised CUDA (CPU
    hosts, where that cost is most of a small run's save) forks it instead, as Megatron-Core's
    writer forks its per-file writer processes.
    """
    global _manager
    if filesystem_async._results_queue is not None:
        return
    start_method = "spawn" if torch.cuda.is_initialized() else "fork"
    _manager = SyncManager(ctx=mp.get_context(start_method))
    _manager.start(initializer=exit_signals.shield_helper_process, initargs=(os.getpid(),))
    filesystem_async._results_queue = _manager.Queue()


def _deferring(write: Callable, errors: list[Exception]) -> Callable:
    @wraps(write)
    def deferred(*args, **kwargs):
        try:
            return write(*args, **kwargs)
        except OSError as err:  # RuntimeError("... file write failed") from torch.save too
            errors.append(err)
        except RuntimeError as err:
            if "write" not in str(err).lower():
                raise
            errors.append(err)

    return deferred


@contextmanager
def deferred_rank0_write_errors() -> Iterator[list]:
    """Record (instead of raising) write errors of the files only rank 0 writes.

    Megatron-Core writes ``.metadata``, ``metadata.json`` and, on 0.16, ``common.pt`` on rank 0
    alone, each followed by a collective (the writers: `rank0_checkpoint_writers`). When one
    of them fails (a full or read-only disk), rank 0 raises and every other rank waits in that
    collective until the timeout. Inside this context the error is recorded in the yielded
    list instead; the caller agrees on it with every rank after the save and stops them all.
    """
    patched = rank0_checkpoint_writers()
    originals = [getattr(owner, name) for owner, name in patched]
    errors: list[Exception] = []
    for (owner, name), original in zip(patched, originals, strict=True):
        setattr(owner, name, _deferring(original, errors))
    try:
        yield errors
    finally:
        for (owner, name), original in zip(patched, originals, strict=True):
            setattr(owner, name, original)
