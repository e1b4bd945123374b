"""Build the training stream and the validation set from Megatron-LM style data flags."""

from __future__ import annotations

import math
import os
from argparse import Namespace

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import get_blend_from_list

from tst_megatron.data.checks import check_pointers, check_token_range, read_index_header
from tst_megatron.data.stream import BlendedStream, DataError, DocumentStream, MockStream

TRAIN, VALID = 0, 1


def parse_blend(paths: list[str], flag: str) -> tuple[list[str], list[float]]:
    """``[PREFIX ...]`` or ``[W1, PREFIX1, W2, PREFIX2, ...]`` -> (prefixes, weights).

    The weights are returned as given; `BlendedStream` normalises them (with a note in the
    log when they do not sum to 1).
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


def build_train_stream(args: Namespace, tokenizer) -> BlendedStream:
    """The training stream of ``--data-path`` (train split) or ``--train-data-path``."""
    if args.mock_data:
        return BlendedStream([MockStream(tokenizer.vocab_size, args.seed)], [1.0])
    if args.train_data_path:
        prefixes, weights = parse_blend(args.train_data_path, "--train-data-path")
        split, which = "1,0,0", TRAIN
    else:
        prefixes, weights = parse_blend(args.data_path, "--data-path")
        split, which = args.split, TRAIN
    streams = []
    for prefix in prefixes:
        dataset = open_indexed_dataset(prefix, args.padded_vocab_size, args.data_cache_path)
        docs = split_documents(len(dataset), split, which)
        if len(docs) == 0:
            raise DataError(f"dataset {prefix!r}: the train split {split!r} holds no documents")
        stream = DocumentStream(dataset, docs, args.seed, prefix)
        check_holds_one_window(stream, args)
        streams.append(stream)
    check_evaluation_datasets(args)
    return BlendedStream(streams, weights)


def check_evaluation_datasets(args: Namespace) -> None:
    """Run the file checks on ``--valid-data-path`` / ``--test-data-path`` at start-up too.

    Megatron-Core's `GPTDataset` reads them later, at the first evaluation, and checks nothing.
    """
    for flag, paths in (
        ("--valid-data-path", args.valid_data_path),
        ("--test-data-path", args.test_data_path),
    ):
        if paths:
            for prefix in parse_blend(paths, flag)[0]:
                open_indexed_dataset(prefix, args.padded_vocab_size, args.data_cache_path)


def check_holds_one_window(stream: DocumentStream, args: Namespace) -> None:
    """Reject a training split shorter than one phase-1 sample window."""
    spec = args.tst.phase_spec(1)
    s, length = spec.bag_size, args.seq_length
    window = spec.window_length(length)
    if stream.tokens_per_epoch >= window:
        return
    if spec.mode == "output-only" and s > 1:
        formula = f"L+s = {length}+{s}"
    elif spec.fold_factor > 1:  # --tst-fold batch: samples of L/s latent positions
        formula = f"s*(L/s+1) = {s}*({length}/{s}+1)"
    else:
        formula = f"s*(L+1) = {s}*({length}+1)"
    raise DataError(
        f"dataset {stream.name!r}: its training split holds {stream.tokens_per_epoch} tokens, "
        f"fewer than one phase-1 sample window of {formula} = {window} tokens "
        f"(--tst-bag-size {s}, --seq-length {length}); give it more data or lower "
        "--seq-length / --tst-bag-size"
    )


def build_valid_dataset(args: Namespace, tokenizer, num_samples: int) -> GPTDataset | None:
    """Megatron-Core `GPTDataset` of ``L+1``-token samples for standard next-token eval."""
    if args.mock_data:
        return None
    if args.valid_data_path:
        blend_per_split = [None, get_blend_from_list(args.valid_data_path), None]
        blend, split = None, None
    elif args.train_data_path:
        return None
    else:
        blend, split, blend_per_split = get_blend_from_list(args.data_path), args.split, None
        if parse_and_normalize_split(args.split)[VALID] == 0:
            return None
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=args.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False,
    )
    sizes = [0, num_samples, 0]
    datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return datasets[VALID]


def mock_valid_windows(tokenizer, seed: int, count: int, window: int) -> torch.Tensor:
    """Validation windows for ``--mock-data`` (the same synthetic sequence)."""
    stream = BlendedStream([MockStream(tokenizer.vocab_size, seed)], [1.0])
    return torch.from_numpy(stream.next_windows(count, window))
