"""The training samples: per phase, Megatron-Core `GPTDataset`s blended as `BlendedDataset` draws.

Each TST phase reads its own blend (`PhaseBlend`): for every dataset of ``--data-path`` a
`GPTDataset` of ``window``-token samples (``sequence_length = window - 1``: ``s*(L+1) - 1`` in
phase 1, ``L`` in phase 2) over that dataset's phase partition (`budget.partition_documents`),
built and cached by Megatron-Core (document index, sample index, shuffle index; ``.npy`` files
under ``--data-cache-path``), and Megatron's blending order between the datasets. So the samples
of a phase come in Megatron's globally shuffled order, and a baseline (phase 2 only) reads
exactly the samples Megatron-LM's `GPTDataset`/`BlendedDataset` give for the same flags.

The position is one count per phase, the samples that phase consumed (Megatron-LM's
``consumed_train_samples``, per phase); it goes into the checkpoint, and a resume or the
second job of a two-job run continues from it. Windows are read with one gather from a memory
map of each ``.bin`` (`PhaseDataset.read`), equal to `GPTDataset.__getitem__`'s tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.utils import Split

from tst_megatron.config import PhaseSpec
from tst_megatron.data.checks import DataError


@dataclass
class PartitionConfig(GPTDatasetConfig):
    """`GPTDatasetConfig` plus the document partition, part of the cached indices' key.

    Megatron-Core keys its cached indices by path, sample count and config, not by the
    document ids; two partitions of one dataset need distinct keys.
    """

    document_partition: str = ""


class PartitionGPTDataset(GPTDataset):
    """Megatron-Core's `GPTDataset`, its cache key extended by `PartitionConfig`'s partition."""

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return [*GPTDataset._key_config_attributes(), "document_partition"]


def partition_key(phase: int, documents: np.ndarray) -> str:
    """``phase <p>: <n> documents <md5 of their ids>`` (the cache key of a partition)."""
    digest = hashlib.md5(np.asarray(documents, dtype=np.int64).tobytes(), usedforsecurity=False)
    return f"phase {phase}: {len(documents)} documents {digest.hexdigest()}"


class PhaseDataset:
    """One dataset's samples for one phase: a `GPTDataset` over the phase's documents.

    ``read(ids)`` gives ``[len(ids), window]`` int64 windows equal to the dataset's
    ``__getitem__(i)`` tokens followed by the last label, gathered in one copy from the
    ``.bin`` memory map with the dataset's own document, sample and shuffle indices.
    """

    def __init__(self, gpt: GPTDataset, name: str) -> None:
        self.gpt = gpt
        self.name = name
        self.window = gpt.config.sequence_length + 1
        dataset = gpt.dataset
        dtype = np.dtype(dataset.index.dtype)
        self._tokens = np.memmap(dataset.path_prefix + ".bin", dtype=dtype, mode="r")
        self._pointers = np.asarray(dataset.index.sequence_pointers, dtype=np.int64) // (
            dtype.itemsize
        )
        self._lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.gpt)

    def read(self, ids: np.ndarray) -> np.ndarray:
        """``[len(ids), window]`` int64 windows of the dataset's samples ``ids``."""
        gpt, window = self.gpt, self.window
        if len(ids) and int(np.max(ids)) >= len(gpt):
            raise DataError(f"dataset {self.name}: sample {int(np.max(ids))} of {len(gpt)} asked")
        shuffled = np.asarray(gpt.shuffle_index[np.asarray(ids, dtype=np.int64)], dtype=np.int64)
        begin = np.asarray(gpt.sample_index[shuffled], dtype=np.int64)  # [n, 2] (doc pos, offset)
        end = np.asarray(gpt.sample_index[shuffled + 1], dtype=np.int64)
        spans = end[:, 0] - begin[:, 0] + 1  # documents each sample touches
        last = np.cumsum(spans) - 1
        first = last - spans + 1
        positions = np.repeat(begin[:, 0] - first, spans) + np.arange(int(spans.sum()))
        docs = np.asarray(gpt.document_index[positions], dtype=np.int64)
        source = self._pointers[docs]
        size = self._lengths[docs]
        size[last] = end[:, 1] + 1  # the last document up to the extra (label) token
        source[first] += begin[:, 1]
        size[first] -= begin[:, 1]
        shift = source - (np.cumsum(size) - size)  # .bin index minus output index, per piece
        index = np.repeat(shift, size) + np.arange(len(ids) * window)
        return self._tokens[index].astype(np.int64).reshape(len(ids), window)


class MockPhase:
    """``--mock-data``: a seeded random sequence repeated; sample i of the phase starts at
    ``start + i * (window - 1)``."""

    def __init__(self, vocab_size: int, seed: int, window: int, start: int,
                 period: int = 10_007) -> None:  # fmt: skip
        self.window = window
        self._start = start
        self._period = period
        self._tokens = np.random.RandomState(seed).randint(0, vocab_size, size=period)

    def read(self, ids: np.ndarray) -> np.ndarray:
        starts = self._start + np.asarray(ids, dtype=np.int64) * (self.window - 1)
        positions = (starts[:, None] + np.arange(self.window)) % self._period
        return self._tokens[positions].astype(np.int64)


@dataclass
class PhaseBlend:
    """One phase's samples: its datasets blended in `BlendedDataset` order.

    ``datasets[k]`` is a `PhaseDataset` (or a `MockPhase`), None when the phase draws nothing
    from dataset k; ``dataset_index[i]`` / ``dataset_sample_index[i]`` say which sample of which
    dataset the phase's sample ``i`` is (`budget.blend_indices`).
    """

    window: int
    datasets: Sequence
    dataset_index: np.ndarray
    dataset_sample_index: np.ndarray

    def read(self, first: int, count: int, rows: slice | None = None) -> np.ndarray:
        """``[len(rows), window]`` windows of the phase's samples ``first .. first + count``."""
        chosen = np.arange(first, first + count)[rows if rows is not None else slice(None)]
        if len(chosen) and chosen[-1] >= len(self.dataset_index):
            raise DataError(
                f"the run asks for sample {int(chosen[-1])} of a phase planned for "
                f"{len(self.dataset_index)} samples"
            )
        which = self.dataset_index[chosen]
        out = np.empty((len(chosen), self.window), dtype=np.int64)
        for k in np.unique(which):
            mine = which == k
            out[mine] = self.datasets[k].read(self.dataset_sample_index[chosen[mine]])
        return out


@dataclass
class SampleState:
    """Checkpointed position: model samples consumed per phase, data tokens consumed."""

    phase_samples: list[int]
    consumed_tokens: int = 0
    plan: list[int] = field(default_factory=lambda: [0, 0])
    datasets: int = 1

    def as_dict(self) -> dict:
        return {
            "phase_samples": list(self.phase_samples),
            "consumed_tokens": self.consumed_tokens,
            "plan": list(self.plan),
            "datasets": self.datasets,
        }

    def copy(self) -> SampleState:
        return SampleState(
            list(self.phase_samples), self.consumed_tokens, list(self.plan), self.datasets
        )


def phase_of(spec: PhaseSpec) -> int:
    """Phase 2 (and baselines) read standard samples; phase 1 anything else."""
    return 2 if spec.is_standard else 1


class TrainingSamples:
    """The run's training samples: one `PhaseBlend` per phase and the consumed counts.

    ``next_windows(spec, count, rows)`` returns the phase's next ``count`` samples (a global
    batch) and advances its count; every data-parallel rank advances over all ``count`` and
    reads only ``rows``, so ranks stay in step without communication. Notes for the training
    log (blend weights normalised, the data budget) are collected identically on every rank;
    `pop_notices` hands them to the one that logs.
    """

    def __init__(self, phases: dict[int, PhaseBlend], notices: list[str] | None = None) -> None:
        self.phases = phases
        self.notices = list(notices or [])
        plan = [len(phases[p].dataset_index) if p in phases else 0 for p in (1, 2)]
        datasets = max(len(b.datasets) for b in phases.values())
        self.state = SampleState([0, 0], 0, plan, datasets)

    def pop_notices(self) -> list[str]:
        """The notes collected since the last call."""
        notices, self.notices = self.notices, []
        return notices

    def next_windows(self, spec: PhaseSpec, count: int, rows: slice | None = None) -> np.ndarray:
        """``[len(rows), spec's window]`` int64 windows of the phase's next ``count`` samples."""
        phase = phase_of(spec)
        blend = self.phases[phase]
        first = self.state.phase_samples[phase - 1]
        out = blend.read(first, count, rows)
        self.state.phase_samples[phase - 1] += count
        self.state.consumed_tokens += count * (blend.window - 1)
        return out

    def load_state(self, state: dict) -> None:
        """Continue from a checkpointed position."""
        if "phase_samples" not in state:
            raise DataError(
                "the checkpoint records the data position as token-stream cursors (saved by a "
                "tst-megatron before Megatron-style shuffled samples); its data position "
                "cannot be continued: finish that run with the version that wrote it"
            )
        if int(state.get("datasets", self.state.datasets)) != self.state.datasets:
            raise DataError(
                f"the checkpoint's data position has {state['datasets']} datasets, this run has "
                f"{self.state.datasets}: resume with the same --data-path blend"
            )
        saved_plan = [int(n) for n in state.get("plan", self.state.plan)]
        if saved_plan != self.state.plan:
            self.notices.append(
                f"note: the checkpoint's data plan was {saved_plan[0]} phase-1 and "
                f"{saved_plan[1]} phase-2 samples, this run's is {self.state.plan[0]} and "
                f"{self.state.plan[1]}: samples come from this run's partitions and order"
            )
        self.state = SampleState(
            [int(n) for n in state["phase_samples"]],
            int(state.get("consumed_tokens", 0)),
            list(self.state.plan),
            self.state.datasets,
        )


def build_phase_dataset(
    dataset, prefix: str, documents: np.ndarray, phase: int, samples: int, window: int,
    config: dict,
) -> PhaseDataset:  # fmt: skip
    """A `PhaseDataset` of ``samples`` ``window``-token samples over ``documents`` of
    ``dataset`` (an `IndexedDataset`), built (rank 0 first, then the others from the cache) by
    Megatron-Core's `BlendedMegatronDatasetBuilder.build_generic_dataset`.

    ``config``: `GPTDatasetConfig` fields (seed, tokenizer, split, cache path, masking flags).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    gpt_config = PartitionConfig(
        sequence_length=window - 1,
        blend=([prefix], None),
        document_partition=partition_key(phase, documents),
        **config,
    )
    gpt = BlendedMegatronDatasetBuilder.build_generic_dataset(
        PartitionGPTDataset,
        lambda: True,
        True,
        dataset,
        prefix,
        np.asarray(documents, dtype=np.int32),
        samples,
        Split.train,
        gpt_config,
    )
    return PhaseDataset(gpt, prefix)
