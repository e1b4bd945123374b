"""The training token stream, shared by both TST phases.

Why not `GPTDataset` for training: it shuffles *samples*, and its sample boundaries depend
on the sequence length, so a phase-1 dataset (windows of ``s*(L+1)`` tokens) and a phase-2
dataset (``L+1``) over the same documents would overlap: phase 2 would re-read phase-1
tokens. TST needs phase 2 to continue "in the token stream after the last token phase 1
consumed". So each dataset of the blend is read as one stream: its split's documents in a
seeded shuffled order (reshuffled per epoch), concatenated; a cursor counts the tokens
consumed. A sample is the next window of the phase's length at the cursor, and consecutive
windows share one token, exactly like `GPTDataset`'s ``L+1``-token samples. The blend
between datasets uses Megatron's greedy rule (the dataset furthest behind its weight goes
next), so per-dataset cursors are all the state there is: they go into the checkpoint and
phase 2 (in-process or a second job) resumes from them.

Validation still uses Megatron-Core's `GPTDataset` (see `validation.py`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """The data cannot serve the requested training (too short, bad blend, bad files)."""


class DocumentStream:
    """One dataset split as an endless document-shuffled token stream.

    Args:
        dataset: a Megatron-Core `IndexedDataset` (or anything with ``sequence_lengths`` and
            ``get(idx, offset, length)``), one sequence per document.
        documents: the document ids of this split.
        seed: shuffle seed; epoch e uses ``RandomState(seed + e)``.
        name: shown in messages.

    Reads gather straight from a memory map of the ``.bin`` file when the dataset is an
    `IndexedDataset` (one fancy-index copy per window, whatever the number of documents it
    crosses); other datasets are read document by document with ``get``.
    """

    def __init__(self, dataset, documents: np.ndarray, seed: int, name: str) -> None:
        self.dataset = dataset
        self.documents = np.asarray(documents, dtype=np.int64)
        self.seed = seed
        self.name = name
        lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)[self.documents]
        self.tokens_per_epoch = int(lengths.sum())
        if self.tokens_per_epoch == 0:
            raise DataError(f"dataset {name} has no tokens in this split")
        self._epoch_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._tokens, self._pointers = _flat_token_view(dataset)

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, start offset of each document in the epoch)."""
        if epoch not in self._epoch_cache:
            if len(self._epoch_cache) > 1:
                self._epoch_cache.clear()
            order = np.random.RandomState(self.seed + epoch).permutation(self.documents)
            lengths = np.asarray(self.dataset.sequence_lengths, dtype=np.int64)[order]
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            self._epoch_cache[epoch] = (order, starts)
        return self._epoch_cache[epoch]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream (crossing documents and epochs)."""
        out = np.empty(length, dtype=np.int64)
        self._read_into(start, out)
        return out

    def read_windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """``[len(starts), length]`` windows starting at the stream positions ``starts``."""
        out = np.empty((len(starts), length), dtype=np.int64)
        for row, start in enumerate(starts):
            self._read_into(int(start), out[row])
        return out

    def _read_into(self, start: int, out: np.ndarray) -> None:
        """Fill ``out`` with the ``len(out)`` tokens from stream position ``start``."""
        length = len(out)
        if self._tokens is None:
            out[:] = self._read_by_document(start, length)
            return
        sources, sizes = [], []
        position, remaining = start, length
        while remaining > 0:
            epoch, offset = divmod(position, self.tokens_per_epoch)
            take = min(remaining, self.tokens_per_epoch - offset)
            order, starts = self._epoch_layout(epoch)
            first = int(np.searchsorted(starts, offset, side="right")) - 1
            last = int(np.searchsorted(starts, offset + take - 1, side="right")) - 1
            docs = order[first : last + 1]
            doc_starts = starts[first : last + 1]
            begin = np.maximum(doc_starts, offset)
            doc_lengths = self.dataset.sequence_lengths[docs].astype(np.int64)
            end = np.minimum(doc_starts + doc_lengths, offset + take)
            sources.append(self._pointers[docs] + (begin - doc_starts))
            sizes.append(end - begin)
            position += take
            remaining -= take
        source, size = np.concatenate(sources), np.concatenate(sizes)
        shift = source - (np.cumsum(size) - size)  # bin index minus window index, per piece
        index = np.repeat(shift, size) + np.arange(length)
        out[:] = self._tokens[index]  # one gather from the memory map, widened on the copy

    def _read_by_document(self, start: int, length: int) -> np.ndarray:
        pieces = []
        position, remaining = start, length
        while remaining > 0:
            epoch, offset = divmod(position, self.tokens_per_epoch)
            order, starts = self._epoch_layout(epoch)
            doc = int(np.searchsorted(starts, offset, side="right")) - 1
            doc_offset = offset - int(starts[doc])
            doc_length = int(self.dataset.sequence_lengths[order[doc]])
            take = min(remaining, doc_length - doc_offset)
            pieces.append(
                np.asarray(self.dataset.get(int(order[doc]), offset=doc_offset, length=take))
            )
            position += take
            remaining -= take
        return np.concatenate(pieces).astype(np.int64)


class _TokenPointers:
    """Token (not byte) offset of each document in the ``.bin``, computed per lookup."""

    def __init__(self, byte_pointers: np.ndarray, itemsize: int) -> None:
        self._bytes = byte_pointers
        self._itemsize = itemsize

    def __getitem__(self, docs: np.ndarray) -> np.ndarray:
        return np.asarray(self._bytes[docs], dtype=np.int64) // self._itemsize


def _flat_token_view(dataset) -> tuple[np.ndarray | None, _TokenPointers | None]:
    """A read-only memory map of an `IndexedDataset`'s whole ``.bin`` and its document offsets.

    None for other datasets (tests' fakes) and for empty files (which cannot be mapped).
    """
    prefix = getattr(dataset, "path_prefix", None)
    index = getattr(dataset, "index", None)
    if prefix is None or index is None or not os.path.getsize(prefix + ".bin"):
        return None, None
    dtype = np.dtype(index.dtype)
    tokens = np.asarray(np.memmap(prefix + ".bin", dtype=dtype, mode="r"))  # plain view
    return tokens, _TokenPointers(index.sequence_pointers, dtype.itemsize)


class MockStream:
    """A synthetic learnable stream for ``--mock-data``: a seeded random sequence repeated."""

    def __init__(self, vocab_size: int, seed: int, period: int = 10_007) -> None:
        self.name = "mock"
        self.tokens_per_epoch = period
        self._tokens = np.random.RandomState(seed).randint(0, vocab_size, size=period)

    def read(self, start: int, length: int) -> np.ndarray:
        return self._tokens[(start + np.arange(length)) % self.tokens_per_epoch].astype(np.int64)

    def read_windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        positions = (np.asarray(starts)[:, None] + np.arange(length)) % self.tokens_per_epoch
        return self._tokens[positions].astype(np.int64)


@dataclass
class StreamState:
    """Checkpointed position of the training stream."""

    cursors: list[int]
    samples: list[int]
    consumed_tokens: int = 0

    def as_dict(self) -> dict:
        return {
            "cursors": list(self.cursors),
            "samples": list(self.samples),
            "consumed_tokens": self.consumed_tokens,
        }


@dataclass
class BlendedStream:
    """Weighted blend of streams with one cursor per stream.

    ``next_windows(n, window)`` returns the next ``n`` windows (a global batch) in order and
    advances the cursors by ``window - 1`` tokens per window. Weights are normalised to sum
    to 1. Notes for the training log (weights normalised, a stream starting a new epoch) are
    collected identically on every rank; `pop_notices` hands them to the one that logs.
    """

    streams: Sequence
    weights: Sequence[float]
    state: StreamState = field(default=None)
    notices: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.streams) != len(self.weights):
            raise DataError(f"{len(self.streams)} datasets but {len(self.weights)} blend weights")
        if not all(math.isfinite(w) and w > 0 for w in self.weights):
            raise DataError(
                f"blend weights must be finite positive numbers, got {list(self.weights)}"
            )
        total = float(sum(self.weights))
        if abs(total - 1.0) > 1e-6:
            given = ", ".join(
                f"{w:g} ({stream.name})"
                for w, stream in zip(self.weights, self.streams, strict=True)
            )
            self.notices.append(
                f"note: blend weights {given} sum to {total:g}; normalised to "
                + ", ".join(f"{w / total:g}" for w in self.weights)
            )
        self.weights = [w / total for w in self.weights]
        if self.state is None:
            self.state = StreamState([0] * len(self.streams), [0] * len(self.streams))
        self._epochs = self._current_epochs()

    def _current_epochs(self) -> list[int]:
        """The epoch each stream's next token lies in."""
        return [
            cursor // stream.tokens_per_epoch
            for cursor, stream in zip(self.state.cursors, self.streams, strict=True)
        ]

    def pop_notices(self) -> list[str]:
        """The notes collected since the last call."""
        notices, self.notices = self.notices, []
        return notices

    def load_state(self, state: dict) -> None:
        if len(state["cursors"]) != len(self.streams):
            raise DataError(
                f"the checkpoint's data position has {len(state['cursors'])} datasets, this run "
                f"has {len(self.streams)}: resume with the same --data-path blend"
            )
        self.state = StreamState(
            [int(c) for c in state["cursors"]],
            [int(c) for c in state["samples"]],
            int(state.get("consumed_tokens", 0)),
        )
        self._epochs = self._current_epochs()

    def _draw_datasets(self, count: int) -> np.ndarray:
        """``[count]`` dataset of each next window: Megatron's greedy blend, from the state.

        The dataset furthest behind its weight goes next (the lowest index on ties). Each
        draw depends on the previous one, so this is one scalar loop over plain floats (about
        a microsecond a window for a few datasets); everything per token is vectorised.
        """
        if len(self.streams) == 1:
            return np.zeros(count, dtype=np.int64)
        weights, samples = list(self.weights), list(self.state.samples)
        drawn = sum(samples)
        choices = np.empty(count, dtype=np.int64)
        for i in range(count):
            drawn += 1
            best, best_error = 0, weights[0] * drawn - samples[0]
            for k in range(1, len(weights)):
                error = weights[k] * drawn - samples[k]
                if error > best_error:
                    best, best_error = k, error
            samples[best] += 1
            choices[i] = best
        return choices

    def next_windows(self, count: int, window: int, rows: slice | None = None) -> np.ndarray:
        """The next ``count`` windows of ``window`` tokens; advances the cursors.

        Every rank advances the cursors over all ``count`` windows (cheap) but reads only
        ``rows`` (its data-parallel share), so ranks stay in step without communication.

        Returns:
            ``[len(rows), window]`` int64 token windows.
        """
        advance = window - 1
        datasets = self._draw_datasets(count)
        starts = np.empty(count, dtype=np.int64)
        for k in range(len(self.streams)):
            picks = np.flatnonzero(datasets == k)
            if not len(picks):
                continue
            starts[picks] = self.state.cursors[k] + advance * np.arange(len(picks))
            self.state.cursors[k] += advance * len(picks)
            self.state.samples[k] += len(picks)
            self._note_epoch(k, self.state.cursors[k])
        self.state.consumed_tokens += advance * count
        chosen = np.arange(count)[rows] if rows is not None else np.arange(count)
        out = np.empty((len(chosen), window), dtype=np.int64)
        for k in np.unique(datasets[chosen]):
            mine = datasets[chosen] == k
            out[mine] = self.streams[k].read_windows(starts[chosen][mine], window)
        return out

    def _note_epoch(self, k: int, last_token: int) -> None:
        """Note once per epoch when stream ``k`` reads past its end and starts over."""
        stream = self.streams[k]
        if isinstance(stream, MockStream):  # mock data repeats by design
            return
        epoch = last_token // stream.tokens_per_epoch
        for new_epoch in range(self._epochs[k] + 1, epoch + 1):
            self.notices.append(
                f"warning: dataset {stream.name}: starting epoch {new_epoch + 1}: the run has "
                f"read all {stream.tokens_per_epoch} tokens of its training split "
                f"{new_epoch} time(s); its data repeats from here"
            )
        self._epochs[k] = max(self._epochs[k], epoch)

    def tokens_available(self) -> int:
        """Tokens in one epoch of every stream together."""
        return sum(s.tokens_per_epoch for s in self.streams)
