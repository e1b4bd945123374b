"""Small Megatron datasets and the reference sample reader, for tests and benchmarks.

- `write_documents`: a ``.bin``/``.idx`` pair holding given documents (Megatron-Core's
  `IndexedDatasetBuilder`).
- `reference_windows`: a phase's samples read one by one through Megatron-Core's own
  `GPTDataset.__getitem__`, the reference the tests compare the vectorised
  `PhaseBlend.read` against and the baseline `benchmarks/data_loader.py` times.
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


def reference_windows(blend, first: int, count: int) -> np.ndarray:
    """``[count, window]`` samples ``first ..`` of a `PhaseBlend`, each from its dataset's
    `GPTDataset.__getitem__` (tokens, then the last label), as `BlendedDataset` picks them."""
    rows = []
    for i in range(first, first + count):
        dataset = blend.datasets[int(blend.dataset_index[i])]
        item = dataset.gpt[int(blend.dataset_sample_index[i])]
        rows.append(np.concatenate([item["tokens"].numpy(), item["labels"][-1:].numpy()]))
    return np.stack(rows).astype(np.int64)
