"""Small Megatron datasets and the reference window reader, for tests and benchmarks.

- `write_documents`: a ``.bin``/``.idx`` pair holding given documents (Megatron-Core's
  `IndexedDatasetBuilder`).
- `reference_next_windows`: the per-window loop that the vectorised
  `BlendedStream.next_windows` replaced (argmax blend draw, per-document reads), the reference
  the tests compare it against and the baseline `benchmarks/data_loader.py` times.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


def write_documents(prefix: Path, documents: list[list[int]], dtype: type = np.int32) -> str:
    """Write ``documents`` (lists of token ids) as ``{prefix}.bin/.idx``; returns the prefix."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in documents:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def reference_next_windows(stream, count: int, window: int, rows: slice) -> np.ndarray:
    """``[len(rows), window]`` windows of a `BlendedStream` drawn one by one (advances it)."""
    state, placements = stream.state, []
    for _ in range(count):
        drawn = sum(state.samples) + 1
        errors = [w * drawn - n for w, n in zip(stream.weights, state.samples, strict=True)]
        k = int(np.argmax(errors))
        placements.append((k, state.cursors[k]))
        state.cursors[k] += window - 1
        state.samples[k] += 1
        state.consumed_tokens += window - 1
    return np.stack([stream.streams[k]._read_by_document(s, window) for k, s in placements[rows]])
