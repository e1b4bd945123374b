"""Build the training samples and the validation set from Megatron-LM style data flags."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import get_blend_from_list

from tst_megatron.config import TSTConfig
from tst_megatron.data import budget
from tst_megatron.data.checks import (
    DataError,
    check_pointers,
    check_token_range,
    read_index_header,
)
from tst_megatron.data.samples import MockPhase, PhaseBlend, TrainingSamples, build_phase_dataset
from tst_megatron.data.tokenizer import Tokenizer
from tst_megatron.settings.batch import BatchConfig
from tst_megatron.settings.data import DataConfig
from tst_megatron.settings.model import ModelConfig
from tst_megatron.settings.schedule import ScheduleConfig

TRAIN, VALID = 0, 1


def parse_blend(paths: list[str] | tuple[str, ...], flag: str) -> tuple[list[str], list[float]]:
    """``[PREFIX ...]`` or ``[W1, PREFIX1, W2, PREFIX2, ...]`` -> (prefixes, weights).

    The weights are returned as given; `build_train_samples` normalises them (with a note in
    the log when they do not sum to 1).
    """
    if len(paths) % 2 == 0 and len(paths) > 0:
        weights_raw = paths[0::2]
        try:
            weights = [float(w) for w in weights_raw]
        except ValueError:
            weights = None
        if weights is not None:
            if not all(math.isfinite(w) and w > 0 for w in weights):
                raise DataError(
                    f"{flag}: blend weights must be finite positive numbers, got {weights_raw}"
                )
            return list(paths[1::2]), weights
    prefixes, weights = get_blend_from_list(paths)
    return list(prefixes), [1.0 / len(prefixes)] * len(prefixes) if weights is None else weights


def open_indexed_dataset(
    prefix: str, vocab_size: int | None = None, cache_dir: str | None = None
) -> IndexedDataset:
    """Open ``prefix.bin/.idx`` after checking the pair is complete and consistent.

    Checks (`tst_megatron.data.checks`): the ``.idx`` header and size, the ``.bin`` size
    against the lengths, the pointer table against the lengths and, with ``vocab_size``, every
    token id of the ``.bin`` against the vocabulary (cached in ``cache_dir`` or beside the
    dataset).
    """
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise DataError(f"dataset {prefix!r}: {prefix + ext} does not exist")
    header = read_index_header(prefix)
    itemsize = np.dtype(header.dtype).itemsize
    actual = os.path.getsize(prefix + ".bin")
    if actual == 0 and header.sequence_count:
        raise DataError(f"dataset {prefix!r}: {prefix}.bin is empty but {prefix}.idx is not")
    dataset = _construct_indexed_dataset(prefix)
    expected = int(np.asarray(dataset.sequence_lengths, dtype=np.int64).sum()) * itemsize
    if actual != expected:
        raise DataError(
            f"dataset {prefix!r}: {prefix}.idx describes {expected} bytes of tokens but "
            f"{prefix}.bin holds {actual}; the pair is truncated or mismatched (re-run "
            "tools/preprocess_data.py)"
        )
    check_pointers(dataset, prefix)
    if vocab_size is not None and len(dataset) > 0:
        check_token_range(dataset, vocab_size, prefix, cache_dir)
    return dataset


def _construct_indexed_dataset(prefix: str) -> IndexedDataset:
    """`IndexedDataset` without its stray ``__del__`` traceback when construction fails.

    Megatron-Core's ``IndexedDataset.__del__`` deletes attributes that a failed
    ``initialize`` never set, which prints "Exception ignored in ... __del__" after our error
    (megatron/core/datasets/indexed_dataset.py); the placeholders make that a no-op.
    """
    try:  # an empty .bin fails mmap, and the half-built reader's __del__ after it
        empty = os.path.getsize(f"{prefix}.bin") == 0
    except OSError:  # missing: the reader's error names it
        empty = False
    if empty:
        raise DataError(
            f"dataset {prefix!r}: {prefix}.bin is empty (0 bytes): the dataset holds no "
            "tokens; preprocess a corpus with text in it, or drop it from the blend"
        )
    dataset = IndexedDataset.__new__(IndexedDataset)
    try:
        dataset.initialize(prefix, False, True, None)
    except Exception as err:  # the reader asserts on a malformed file
        dataset.__dict__.setdefault("bin_reader", None)
        dataset.__dict__.setdefault("index", None)
        raise DataError(f"dataset {prefix!r}: cannot read {prefix}.idx ({err})") from err
    return dataset


def split_documents(num_documents: int, split: str, which: int) -> np.ndarray:
    """Document ids of split ``which`` (0 train, 1 valid, 2 test), as Megatron-Core splits."""
    weights = parse_and_normalize_split(split)
    bounds = np.cumsum([0.0, *weights])
    begin = round(bounds[which] * num_documents)
    end = round(bounds[which + 1] * num_documents)
    return np.arange(begin, end, dtype=np.int64)


@dataclass
class DataPlan:
    """What the run reads from each dataset of its blend, before any index is built.

    ``datasets[k]`` = (prefix, `IndexedDataset`, training-split document ids); per phase the
    `BlendedDataset`-order indices and, per dataset, its partition and sample count.
    """

    split: str
    datasets: list[tuple[str, IndexedDataset, np.ndarray]]
    plans: list[budget.PhasePlan]
    indices: dict[int, tuple[np.ndarray, np.ndarray]]
    partitions: list[tuple[np.ndarray, np.ndarray]]
    budgets: list[budget.DatasetBudget]
    notices: list[str]

    def count(self, phase: int, k: int) -> int:
        """Samples phase ``phase`` draws from dataset ``k``."""
        return int(np.count_nonzero(self.indices[phase][0] == k))


def plan_data(
    data: DataConfig,
    schedule: ScheduleConfig,
    batch: BatchConfig,
    tst: TSTConfig,
    seq_length: int,
    vocab_size: int | None,
) -> DataPlan:
    """Check every dataset (`open_indexed_dataset` with ``vocab_size``, one phase-1 window)
    and plan the run's reads: blend order, partitions, the data budget (``--data-path`` /
    ``--train-data-path``; the planner calls this with ``vocab_size`` None)."""
    plans = budget.phase_plans(tst, schedule, batch, seq_length)
    if data.train_data_path:
        prefixes, weights = parse_blend(data.train_data_path, "--train-data-path")
        split = "1,0,0"
    else:
        prefixes, weights = parse_blend(data.data_path or (), "--data-path")
        split = data.split
    notices = [_normalised_note(prefixes, weights)] if abs(sum(weights) - 1.0) > 1e-6 else []
    weights = [w / sum(weights) for w in weights]
    opened = []
    for prefix in prefixes:
        dataset = open_indexed_dataset(prefix, vocab_size, data.data_cache_path)
        docs = split_documents(len(dataset), split, TRAIN)
        if len(docs) == 0:
            raise DataError(f"dataset {prefix!r}: the train split {split!r} holds no documents")
        check_holds_one_window(prefix, _tokens(dataset, docs), tst, seq_length)
        opened.append((prefix, dataset, docs))
    indices = {plan.phase: budget.blend_indices(weights, plan.samples) for plan in plans}
    counts = {p: np.bincount(index[0], minlength=len(prefixes)) for p, index in indices.items()}
    partitions, budgets = [], []
    for k, (prefix, dataset, docs) in enumerate(opened):
        phase1, phase2 = (budget.tokens_for(int(counts[p.phase][k]), p.window) for p in plans)
        lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)[docs]
        parts = budget.partition_documents(docs, lengths, phase1, plans[1].window, schedule.seed)
        partitions.append(parts)
        held = (_tokens(dataset, parts[0]), _tokens(dataset, parts[1]))
        budgets.append(budget.DatasetBudget(prefix, int(lengths.sum()), held, (phase1, phase2)))
    notices += budget.budget_lines(budgets, tst.enabled)
    return DataPlan(split, opened, plans, indices, partitions, budgets, notices)


def _tokens(dataset: IndexedDataset, documents: np.ndarray) -> int:
    return int(np.asarray(dataset.sequence_lengths, dtype=np.int64)[documents].sum())


def build_train_samples(
    data: DataConfig,
    schedule: ScheduleConfig,
    batch: BatchConfig,
    tst: TSTConfig,
    model: ModelConfig,
    tokenizer: Tokenizer,
) -> TrainingSamples:
    """The training samples of ``--data-path`` (train split) or ``--train-data-path``.

    `plan_data` checks every file against ``model.padded_vocab_size`` and plans first; then
    each phase's `GPTDataset`s of ``model.seq_length`` are built over the planned document
    partitions (collective: rank 0 builds the cached indices, the other ranks load them).
    """
    if data.mock_data:
        plans = budget.phase_plans(tst, schedule, batch, model.seq_length)
        return mock_samples(tokenizer.vocab_size, schedule.seed, plans)
    planned = plan_data(data, schedule, batch, tst, model.seq_length, model.padded_vocab_size)
    check_evaluation_datasets(data, model.padded_vocab_size)
    config: dict[str, Any] = {
        "random_seed": schedule.seed,
        "tokenizer": tokenizer,
        "split": planned.split,
        "path_to_cache": data.data_cache_path,
        "reset_position_ids": False,
        "reset_attention_mask": False,
        "eod_mask_loss": False,
        "create_attention_mask": False,
    }
    phases = {}
    for i, plan in enumerate(planned.plans):
        datasets = []
        for k, (prefix, dataset, _) in enumerate(planned.datasets):
            count, documents = planned.count(plan.phase, k), planned.partitions[k][i]
            built = None
            if count:
                built = build_phase_dataset(
                    dataset, prefix, documents, plan.phase, count, plan.window, config
                )
            datasets.append(built)
        phases[plan.phase] = PhaseBlend(plan.window, datasets, *planned.indices[plan.phase])
    return TrainingSamples(phases, planned.notices)


def _normalised_note(prefixes: list[str], weights: list[float]) -> str:
    given = ", ".join(f"{w:g} ({p})" for w, p in zip(weights, prefixes, strict=True))
    total = sum(weights)
    return f"note: blend weights {given} sum to {total:g}; normalised to " + ", ".join(
        f"{w / total:g}" for w in weights
    )


def mock_samples(vocab_size: int, seed: int, plans: list[budget.PhasePlan]) -> TrainingSamples:
    """``--mock-data``: phase 2 continues the mock sequence after phase 1's planned samples."""
    phases, start = {}, 0
    for plan in plans:
        zeros = np.zeros(plan.samples, dtype=np.int16)
        mock = MockPhase(vocab_size, seed, plan.window, start)
        phases[plan.phase] = PhaseBlend(plan.window, [mock], zeros, np.arange(plan.samples))
        start += plan.samples * (plan.window - 1)
    return TrainingSamples(phases)


def check_evaluation_datasets(data: DataConfig, vocab_size: int | None) -> None:
    """Run the file checks on ``--valid-data-path`` / ``--test-data-path`` at start-up too.

    Megatron-Core's `GPTDataset` reads them later, at the first evaluation, and checks nothing.
    """
    for flag, paths in (
        ("--valid-data-path", data.valid_data_path),
        ("--test-data-path", data.test_data_path),
    ):
        if paths:
            for prefix in parse_blend(paths, flag)[0]:
                open_indexed_dataset(prefix, vocab_size, data.data_cache_path)


def check_holds_one_window(prefix: str, tokens: int, tst: TSTConfig, seq_length: int) -> None:
    """Reject a training split of ``tokens`` tokens shorter than one phase-1 sample window."""
    spec = tst.phase_spec(1)
    s, length = spec.bag_size, seq_length
    window = spec.window_length(length)
    if tokens >= window:
        return
    if spec.mode == "output-only" and s > 1:
        formula = f"L+s = {length}+{s}"
    elif spec.fold_factor > 1:  # --tst-fold batch: samples of L/s latent positions
        formula = f"s*(L/s+1) = {s}*({length}/{s}+1)"
    else:
        formula = f"s*(L+1) = {s}*({length}+1)"
    raise DataError(
        f"dataset {prefix!r}: its training split holds {tokens} tokens, "
        f"fewer than one phase-1 sample window of {formula} = {window} tokens "
        f"(--tst-bag-size {s}, --seq-length {length}); give it more data or lower "
        "--seq-length / --tst-bag-size"
    )


def build_valid_dataset(
    data: DataConfig, seed: int, seq_length: int, tokenizer: Tokenizer, num_samples: int
) -> GPTDataset | None:
    """Megatron-Core `GPTDataset` of ``L+1``-token samples (``L`` = ``seq_length``) for
    standard next-token eval, in the order of ``--seed`` (``seed``)."""
    if data.mock_data:
        return None
    if data.valid_data_path:
        blend_per_split = [None, get_blend_from_list(list(data.valid_data_path)), None]
        blend, split = None, None
    elif data.train_data_path:
        return None
    else:
        blend, split = get_blend_from_list(list(data.data_path or ())), data.split
        blend_per_split = None
        if parse_and_normalize_split(data.split)[VALID] == 0:
            return None
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=data.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=data.eod_mask_loss,
        create_attention_mask=False,
    )
    sizes = [0, num_samples, 0]
    datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return datasets[VALID]


def mock_valid_windows(tokenizer: Tokenizer, seed: int, count: int, window: int) -> torch.Tensor:
    """Validation windows for ``--mock-data`` (the same synthetic sequence, from its start)."""
    return torch.from_numpy(MockPhase(tokenizer.vocab_size, seed, window, 0).read(np.arange(count)))
