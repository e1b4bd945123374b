"""``--manual-gc``: Python's garbage collector at fixed points, as Megatron-LM's training loop.

The automatic collector runs whenever allocation counts cross a threshold, at a different
moment on every rank; one rank collecting inside a collective stalls all the others. With
``--manual-gc`` it is disabled for the run and a full collection runs at the start, every
``--manual-gc-interval`` steps (0 = never between steps) and, unless
``--no-manual-gc-eval``, before each evaluation (full) and after it (generation 0: what the
evaluation made). The collector is re-enabled when training ends.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from tst_megatron.settings.reliability import ReliabilityConfig


class ManualGarbageCollection:
    """The collection points of one run (all no-ops without ``--manual-gc``)."""

    def __init__(self, reliability: ReliabilityConfig) -> None:
        self.enabled = reliability.manual_gc
        self.interval = reliability.manual_gc_interval
        self.around_eval = reliability.manual_gc_eval

    def describe(self) -> str:
        every = f"every {self.interval} steps" if self.interval else "never between steps"
        around = ", and around each evaluation" if self.around_eval else ""
        return f"manual garbage collection: automatic collector off; collecting {every}{around}"

    def start(self) -> None:
        if self.enabled:
            gc.disable()
            gc.collect()

    def after_step(self, iteration: int) -> None:
        if self.enabled and self.interval and iteration % self.interval == 0:
            gc.collect()

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        if self.enabled and self.around_eval:
            gc.collect()
        yield
        if self.enabled and self.around_eval:
            gc.collect(generation=0)
