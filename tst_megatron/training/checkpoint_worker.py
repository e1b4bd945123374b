"""``--use-persistent-ckpt-worker``: one checkpoint-writer process per rank for ``--async-save``.

Megatron-LM 0.16.1 runs ``--async-save`` only with ``--use-persistent-ckpt-worker``
(``megatron/training/arguments.py`` turns it off otherwise): Megatron-Core's default caller
(`TemporalAsyncCaller`) forks a writer from the rank at every save, and a fork of a process
that holds CUDA and NCCL state is unsafe. The persistent worker is spawned once, at the first
async save, and runs every save's ``async_fn`` (the shard writes of `FileSystemWriterAsync`)
while the rank trains. `PersistentCheckpointWorker` is that worker as an `AsyncCaller` of
Megatron-Core's `AsyncCallsQueue` (``dist_checkpointing/strategies/async_utils.py``), with the
protocol of Megatron-Core's `PersistentAsyncCaller`: the rank queues the request; the worker
copies the GPU tensors to the host (``FileSystemWriterAsync.preload_tensors``, CUDA IPC) while
the rank waits, acknowledges, writes, and reports completion; the rank finalizes once every
rank's worker reported. It differs where that caller fails here:

* **Host tensors are copied before the rank goes on.** A CPU tensor in the request reaches
  the worker through shared memory *as it is* (pickling moves the rank's own storage there),
  so the worker would write what later steps made of it (Megatron-Core's ``TODO`` in
  ``_clone_if_needed``). The rank copies each host tensor into shared memory first; on CPU
  hosts every tensor is one, so an async save there is as exact as a synchronous one.
* **Exit signals.** The worker runs `exit_signals.shield_helper_process`: the SIGTERM torchrun
  sends to each worker's process group, or Slurm's signal to every process of the step, does
  not kill it while the rank saves at exit; it exits once the rank is gone.
* **Shard digests** (`checkpoint_files.WrittenDigests`) are taken in the worker and its
  forked writers and reported to the rank through a queue the worker inherits.
* **A dead worker is an error**, not an endless wait; a rank with nothing to write in a save
  does not wait for a completion that never comes.
* **CPU hosts**: no CUDA device is set in the worker (Megatron-Core's loop divides by the
  device count).

Every host tensor shared with the worker takes one file descriptor there until its save is
written (PyTorch's ``file_descriptor`` sharing): fine for the CPU runs that have such tensors.
"""

from __future__ import annotations

import atexit
import os
from collections import deque
from multiprocessing.process import BaseProcess
from queue import Empty

import torch
import torch.multiprocessing as mp
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCaller, AsyncRequest
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

from tst_megatron.training import exit_signals
from tst_megatron.training.checkpoint_files import Digest, digesting_open

POLL_S = 1.0  # how often a waiting rank checks that its worker is alive
CLOSE_TIMEOUT_S = 60.0  # a clean stop (no save pending) waits this long, then kills


class CheckpointWorkerDied(RuntimeError):
    """The rank's checkpoint worker exited while a save was in its hands."""


class PersistentCheckpointWorker(AsyncCaller):
    """This rank's checkpoint worker (see the module doc); one per process."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._ctx = ctx
        self.process: BaseProcess | None = None
        self._requests = ctx.Queue()  # rank -> worker: (call index, fn, args, kwargs, stage)
        self._staged = ctx.Queue()  # worker -> rank: the GPU tensors are on the host
        self._done = ctx.Queue()  # worker -> rank: call index written
        self._digests = ctx.SimpleQueue()  # worker and its writers -> rank: (file, digest)
        self._calls: deque[tuple[int, bool]] = deque()  # (call index, queued to the worker)
        self._finished: set[int] = set()
        atexit.register(self.close, abort=True)  # runs before multiprocessing joins children

    def schedule_async_call(self, async_req: AsyncRequest) -> None:
        """Hand ``async_req`` to the worker (started at the first call). All ranks call it."""
        queued = async_req.async_fn is not None
        self._calls.append((async_req.call_idx, queued))
        if not queued:
            return
        args = list(async_req.async_fn_args)
        args[1], on_gpu = _host_snapshot(args[1])  # the write buckets (AsyncRequest's layout)
        self._start()
        self._requests.put(
            (async_req.call_idx, async_req.async_fn, tuple(args), async_req.async_fn_kwargs,
             on_gpu)
        )  # fmt: skip
        if on_gpu:  # the worker copies them to the host now; they must not change meanwhile
            self._wait(self._staged, "copying the checkpoint's GPU tensors to the host")

    def is_current_async_call_done(self, blocking: bool = False, no_dist: bool = False) -> bool:
        """Whether the oldest call is written on every rank (waits for it when ``blocking``).

        All ranks call it (one small all-reduce) unless ``no_dist``.
        """
        call_idx, queued = self._calls[0]
        if queued and call_idx not in self._finished:
            if blocking:
                self._finished.add(self._wait(self._done, "writing the checkpoint"))
            else:
                self._collect_done()
        alive = int(queued and call_idx not in self._finished)
        done = not alive if no_dist else bool(self.sync_all_async_calls(alive))
        if done:
            self._calls.popleft()
            self._finished.discard(call_idx)
        return done

    def written_digests(self) -> dict[str, Digest]:
        """The digests of the shard files written since the last call (call once a save is
        done on this rank)."""
        found = {}
        while not self._digests.empty():
            name, digest = self._digests.get()
            found[name] = digest
        return found

    def close(self, abort: bool = False) -> None:
        """Stop the worker: after its last write, or at once (``abort``: a save still in
        flight stays unpublished, as when the rank is killed)."""
        if self.process is None:
            return
        if not abort and self.process.is_alive():
            self._requests.put(None)
            self.process.join(CLOSE_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.process = None

    def __del__(self) -> None:
        pass  # closed by `close` (atexit at the latest), never during garbage collection

    def _start(self) -> None:
        if self.process is not None:
            return
        device = torch.cuda.current_device() if torch.cuda.is_available() else None
        process = self._ctx.Process(
            target=_worker_loop,
            args=(os.getpid(), device, self._requests, self._staged, self._done, self._digests),
            name=f"checkpoint-worker-{torch.distributed.get_rank()}",
        )
        self.process = process
        process.start()

    def _collect_done(self) -> None:
        while True:
            try:
                self._finished.add(self._done.get_nowait())
            except Empty:
                return

    def _wait(self, queue, what: str) -> int:
        process = self.process
        assert process is not None  # `_start` ran for the call this waits on
        while True:
            try:
                return queue.get(timeout=POLL_S)
            except Empty:
                if not process.is_alive():
                    code = process.exitcode
                    self.process = None
                    raise CheckpointWorkerDied(
                        f"the checkpoint worker of rank {torch.distributed.get_rank()} exited "
                        f"with code {code} while {what} (its error is above in the log)"
                    ) from None


def _host_snapshot(buckets: list) -> tuple[list, bool]:
    """The write buckets ``[(file, key, (bytes items, [(item, tensor)]))]`` with every host
    tensor copied into shared memory (GPU tensors as they are); and whether any is on a GPU."""
    staged, on_gpu = [], False
    for file_name, storage_key, (bytes_data, tensor_data) in buckets:
        tensors = []
        for item, tensor in tensor_data:
            if tensor.device.type == "cpu":
                copy = torch.empty(tensor.shape, dtype=tensor.dtype).share_memory_()
                tensor = copy.copy_(tensor)
            else:
                on_gpu = True
            tensors.append((item, tensor))
        staged.append((file_name, storage_key, (bytes_data, tensors)))
    return staged, on_gpu


def _worker_loop(parent_pid: int, device: int | None, requests, staged, done, digests) -> None:
    """The worker process: write each request's shards until ``None`` arrives."""
    exit_signals.shield_helper_process(parent_pid)
    if device is not None:
        torch.cuda.set_device(device)
    filesystem_async.open = digesting_open(lambda name, digest: digests.put((name, digest)))
    while (request := requests.get()) is not None:
        call_idx, async_fn, args, kwargs, on_gpu = request
        if on_gpu:
            args = (args[0], FileSystemWriterAsync.preload_tensors(args[1]), *args[2:])
            staged.put(call_idx)
        async_fn(*args, **kwargs)
        done.put(call_idx)
        del request, args
