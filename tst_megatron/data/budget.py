"""What each TST phase reads: planned samples, the document partition, the data budget.

A phase reads ``samples`` model samples of ``window`` tokens (consecutive samples of a
Megatron-Core `GPTDataset` share one token, so a sample advances ``window - 1`` tokens). The
plan comes from the schedule alone (``--train-iters``, the phase-1 length, the global batch
and its ramp-up, the batch fold), so the two jobs of a two-job run and every resume compute
the same plan, and the same partitions from it.

Each dataset of the blend is partitioned between the phases (`partition_documents`): its
training split's documents in a seeded shuffled order, phase 1 taking the shortest prefix that
holds its demand and phase 2 the rest, so phase 2 reads no token phase 1 read while unseen
data remains. `budget_lines` states, before step 1, what that means per dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tst_megatron.config import TSTConfig
from tst_megatron.settings.batch import BatchConfig
from tst_megatron.settings.schedule import ScheduleConfig

TST_REPEATS_WARNING = (
    "warning: this TST run reads some of its data more than once (see the data budget above): "
    "TST's gain is an equal-FLOPs gain that assumes fresh data, and on repeated data a "
    "baseline that reads each token once can win. Alternatives: --tst-mode output-only "
    "(reads no extra data), a smaller --tst-phase1-fraction (r) or --tst-bag-size (s), or more "
    "data"
)


@dataclass(frozen=True)
class PhasePlan:
    """One phase's reads: ``samples`` model samples (all data-parallel ranks) of ``window``."""

    phase: int
    samples: int
    window: int


def global_batch_at(batch: BatchConfig, consumed_samples: int) -> int:
    """The global batch after ``consumed_samples``: ``--rampup-batch-size`` as Megatron-Core's
    `RampupBatchsizeNumMicroBatchesCalculator` ramps it (0.16), else ``--global-batch-size``."""
    if not batch.rampup_batch_size:
        return batch.global_batch_size
    start, increment, ramp_samples = (int(v) for v in batch.rampup_batch_size)
    if consumed_samples > ramp_samples:
        return batch.global_batch_size
    per_increment = ramp_samples / ((batch.global_batch_size - start) // increment)
    return start + int(consumed_samples / per_increment) * increment


def phase_plans(
    tst: TSTConfig, schedule: ScheduleConfig, batch: BatchConfig, seq_length: int
) -> list[PhasePlan]:
    """The planned reads of phase 1 and phase 2 (``samples`` 0 for a phase the run lacks) of
    ``schedule.train_iters`` steps at context ``seq_length``."""
    train_iters = schedule.train_iters
    phase1_iters = tst.phase1_iterations(train_iters)
    configured, consumed = [0, 0], 0
    for iteration in range(train_iters):
        gbs = global_batch_at(batch, consumed)
        if gbs == batch.global_batch_size:  # ramp-up over: the rest in closed form
            configured[0] += max(phase1_iters - iteration, 0) * gbs
            configured[1] += (train_iters - max(iteration, phase1_iters)) * gbs
            break
        configured[0 if iteration < phase1_iters else 1] += gbs
        consumed += gbs
    plans = []
    for phase, count in zip((1, 2), configured, strict=True):
        spec = tst.phase_spec(phase)
        plans.append(PhasePlan(phase, count * spec.fold_factor, spec.window_length(seq_length)))
    return plans


def blend_indices(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """``[size]`` dataset of each blended sample and its sample number within that dataset.

    Megatron-Core's `BlendedDataset` order (``helpers.build_blending_indices``: the dataset
    furthest behind its weight goes next). ``weights`` must sum to 1.
    """
    from megatron.core.datasets import helpers

    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    if size:
        helpers.build_blending_indices(
            dataset_index,
            dataset_sample_index,
            np.asarray(weights, dtype=np.float64),
            len(weights),
            size,
            False,
        )
    return dataset_index, dataset_sample_index


def tokens_for(samples: int, window: int) -> int:
    """Distinct tokens ``samples`` consecutive ``window``-token samples span (0 for none)."""
    return samples * (window - 1) + 1 if samples else 0


def partition_documents(
    documents: np.ndarray,
    lengths: np.ndarray,
    phase1_tokens: int,
    min_phase2_tokens: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(phase-1 documents, phase-2 documents), each sorted, of one dataset's training split.

    The split's documents in the order ``RandomState(seed).permutation``; phase 1 takes the
    shortest prefix holding ``phase1_tokens``, phase 2 the rest. When phase 1 needs the whole
    split, or the rest holds fewer than ``min_phase2_tokens`` (one phase-2 sample), there is no
    unseen data left for phase 2 and it reads the whole split. Args: ``lengths`` are the token
    counts of ``documents``.
    """
    documents = np.asarray(documents, dtype=np.int64)
    if phase1_tokens <= 0:
        return documents[:0], documents
    order = np.random.RandomState(seed).permutation(len(documents))
    cumulative = np.cumsum(np.asarray(lengths, dtype=np.int64)[order])
    cut = int(np.searchsorted(cumulative, phase1_tokens)) + 1  # first prefix holding it
    phase1 = np.sort(documents[order[:cut]])
    rest = int(cumulative[-1] - cumulative[min(cut, len(order)) - 1])
    if cut >= len(order) or rest < min_phase2_tokens:
        return phase1 if cut < len(order) else documents, documents
    return phase1, np.sort(documents[order[cut:]])


@dataclass(frozen=True)
class DatasetBudget:
    """One dataset of the blend: tokens held (training split), per phase the tokens of its
    partition and the tokens the run reads from it."""

    name: str
    tokens: int
    partition_tokens: tuple[int, int]
    read_tokens: tuple[int, int]

    @property
    def epochs(self) -> float:
        """Tokens read over tokens held."""
        return sum(self.read_tokens) / self.tokens

    def phase_epochs(self, phase: int) -> float:
        held = self.partition_tokens[phase - 1]
        return self.read_tokens[phase - 1] / held if held else 0.0

    @property
    def repeats(self) -> bool:
        """Some token is read more than once."""
        return any(self.phase_epochs(p) > 1 for p in (1, 2)) or self.epochs > 1


def budget_lines(budgets: list[DatasetBudget], tst: bool) -> list[str]:
    """The start-up data budget: one line per dataset, and the TST warning when data repeats."""
    lines = []
    for b in budgets:
        phases = []
        for phase in (1, 2):
            if b.read_tokens[phase - 1]:
                phases.append(
                    f"phase {phase} reads {b.read_tokens[phase - 1]:,} "
                    f"({b.phase_epochs(phase):.2f} epochs of its "
                    f"{b.partition_tokens[phase - 1]:,}-token partition)"
                )
        lines.append(
            f"data budget: dataset {b.name}: {b.tokens:,} training tokens; "
            + "; ".join(phases)
            + f"; {b.epochs:.2f} epochs in all"
        )
    if tst and any(b.repeats for b in budgets):
        lines.append(TST_REPEATS_WARNING)
    return lines
