"""Build the training stream and the validation set from Megatron-LM style data flags."""

from __future__ import annotations

import os
from argparse import Namespace

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import get_blend_from_list

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
            if any(w <= 0 for w in weights):
                raise DataError(f"{flag}: blend weights must be positive, got {weights_raw}")
            return list(paths[1::2]), weights
    prefixes, weights = get_blend_from_list(paths)
    return list(prefixes), [1.0 / len(prefixes)] * len(prefixes) if weights is None else weights


def open_indexed_dataset(prefix: str, vocab_size: int | None = None) -> IndexedDataset:
    """Open ``prefix.bin/.idx``, checking the pair is complete and consistent."""
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise DataError(f"dataset {prefix!r}: {prefix + ext} does not exist")
    try:
        dataset = IndexedDataset(prefix, multimodal=False, mmap=True)
    except Exception as err:  # the reader asserts on a malformed header
        raise DataError(f"dataset {prefix!r}: cannot read {prefix}.idx ({err})") from err
    itemsize = np.dtype(dataset.index.dtype).itemsize
    expected = int(np.asarray(dataset.sequence_lengths, dtype=np.int64).sum()) * itemsize
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        raise DataError(
            f"dataset {prefix!r}: {prefix}.idx describes {expected} bytes of tokens but "
            f"{prefix}.bin holds {actual}; the pair is truncated or mismatched (re-run "
            "tools/preprocess_data.py)"
        )
    if vocab_size is not None and len(dataset) > 0:
        check_token_range(dataset, vocab_size, prefix)
    return dataset


def check_token_range(dataset: IndexedDataset, vocab_size: int, prefix: str) -> None:
    """Sample up to 64 documents and reject token ids >= the model's vocabulary."""
    count = len(dataset)
    for doc in np.linspace(0, count - 1, num=min(count, 64), dtype=np.int64):
        tokens = dataset.get(int(doc))
        if len(tokens) and int(tokens.max()) >= vocab_size:
            raise DataError(
                f"dataset {prefix!r}: document {int(doc)} holds token id {int(tokens.max())} "
                f"but the model's vocabulary has {vocab_size} entries (was the data "
                "tokenized with another tokenizer?)"
            )


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
        dataset = open_indexed_dataset(prefix, args.padded_vocab_size)
        docs = split_documents(len(dataset), split, which)
        if len(docs) == 0:
            raise DataError(f"dataset {prefix!r}: the train split {split!r} holds no documents")
        stream = DocumentStream(dataset, docs, args.seed, prefix)
        check_holds_one_window(stream, args)
        streams.append(stream)
    return BlendedStream(streams, weights)


def check_holds_one_window(stream: DocumentStream, args: Namespace) -> None:
    """Reject a training split shorter than one phase-1 sample window."""
    spec = args.tst.phase_spec(1)
    s, length = spec.bag_size, args.seq_length
    window = spec.window_length(length)
    if stream.tokens_per_epoch >= window:
        return
    formula = (
        f"L+s = {length}+{s}"
        if spec.mode == "output-only" and s > 1
        else (f"s*(L+1) = {s}*({length}+1)")
    )
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
