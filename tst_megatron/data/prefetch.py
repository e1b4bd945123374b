"""Training steps' batches prepared ahead on a background thread (``--num-workers``).

``--num-workers N``: 0 prepares each step's batches on the training thread when the step
asks for them; N >= 1 keeps up to N steps prepared ahead by one background thread while the
current step computes (Megatron-LM's flag counts DataLoader worker processes; here the
position is one sample count per phase, so one thread reads it and N is the prefetch depth).

Exactness: a prepared step records the samples' position *after* its windows. The position of
the last step handed to training (`StepPrefetcher.state`) is what checkpoints save, never the
position the thread has read ahead to, so a resume continues exactly after the last trained
step. Notes the samples write travel with their step and reach the log when that step is
trained.

Prediction: the thread prepares the steps the trainer announces as ``upcoming``. When a step
then asks for something else (the phase boundary, a batch-size ramp-up), the prepared steps
are discarded, the samples go back to the trained position and the step is prepared anew:
identical batches to a run without prefetch, only slower for that one step.

An exception in the thread (an unreadable file) is re-raised on the training thread by the
step that needed the batches.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tst_megatron.config import PhaseSpec
from tst_megatron.data.samples import SampleState, TrainingSamples


@dataclass(frozen=True)
class StepRequest:
    """What one training step reads; equal requests at one stream position give equal batches."""

    spec: PhaseSpec
    num_microbatches: int


@dataclass
class PreparedStep:
    """One step's host batches and the stream position and notes after its windows."""

    request: StepRequest
    batches: list
    state: SampleState
    notices: list[str]


_STOP = object()


class StepPrefetcher:
    """The training stream as a source of whole steps, optionally read ahead.

    Args:
        stream: the run's `TrainingSamples`; only this object (or its thread) touches it.
        produce: ``produce(stream, request) -> batches``, reads the step's windows and lays
            them out (runs on the background thread when ``depth >= 1``).
        depth: steps prepared ahead (``--num-workers``); 0 = synchronous.
    """

    def __init__(
        self,
        stream: TrainingSamples,
        produce: Callable[[TrainingSamples, StepRequest], list],
        depth: int,
    ) -> None:
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self._stream = stream
        self._produce = produce
        self.depth = depth
        self._state = stream.state.copy()
        self._notices = stream.pop_notices()
        self._pending: deque[StepRequest] = deque()
        self._requests: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self.last_wait_s = 0.0
        self.total_wait_s = 0.0

    # --- the stream's interface for the trainer ------------------------------------------
    @property
    def state(self) -> SampleState:
        """Position after the last step handed out (what a checkpoint must save)."""
        return self._state

    def pop_notices(self) -> list[str]:
        """Notes of the steps handed out so far (and of the stream's construction)."""
        notices, self._notices = self._notices, []
        return notices

    def load_state(self, state: dict) -> None:
        """Continue from a checkpointed position (drops anything prepared)."""
        self._drain()
        self._stream.load_state(state)
        self._state = self._stream.state.copy()

    # --- steps --------------------------------------------------------------------------
    def next_step(self, request: StepRequest, upcoming: Sequence[StepRequest] = ()) -> list:
        """The batches of the step ``request`` describes; then prepares ``upcoming`` ahead.

        ``upcoming`` are the requests the next steps are expected to make (at most ``depth``
        are prepared); a wrong guess costs time, never exactness.
        """
        start = time.perf_counter()
        if self.depth == 0:
            prepared = self._prepare(request)
        else:
            prepared = self._take(request)
            self._submit_ahead(upcoming)
        self.last_wait_s = time.perf_counter() - start
        self.total_wait_s += self.last_wait_s
        self._state = prepared.state
        self._notices.extend(prepared.notices)
        return prepared.batches

    def close(self) -> None:
        """Stop the thread (prepared steps are dropped; the stream stays at `state`)."""
        self._drain()
        if self._thread is not None:
            self._requests.put(_STOP)
            self._thread.join()
            self._thread = None

    # --- internals ----------------------------------------------------------------------
    def _prepare(self, request: StepRequest) -> PreparedStep:
        batches = self._produce(self._stream, request)
        return PreparedStep(request, batches, self._stream.state.copy(), self._stream.pop_notices())

    def _take(self, request: StepRequest) -> PreparedStep:
        if self._pending and self._pending[0] != request:
            self._drain()  # the guess was wrong: back to the last trained position
        if not self._pending:
            self._submit(request)
        self._pending.popleft()
        prepared, error = self._results.get()
        if error is not None:
            self._drain()
            raise error
        return prepared

    def _submit_ahead(self, upcoming: Sequence[StepRequest]) -> None:
        for request in list(upcoming)[len(self._pending) : self.depth]:
            self._submit(request)

    def _submit(self, request: StepRequest) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name="tst-data-prefetch", daemon=True
            )
            self._thread.start()
        self._pending.append(request)
        self._requests.put(request)

    def _work(self) -> None:
        while True:
            request = self._requests.get()
            if request is _STOP:
                return
            try:
                self._results.put((self._prepare(request), None))
            except BaseException as error:  # handed to the training thread
                self._results.put((None, error))

    def _drain(self) -> None:
        """Wait for every step in flight, drop them and rewind the stream to `state`."""
        if not self._pending:
            return
        while self._pending:
            self._pending.popleft()
            self._results.get()
        self._stream.load_state(self._state.as_dict())
        self._stream.pop_notices()
