"""Integrity checks of a Megatron ``.bin``/``.idx`` dataset, before training reads it.

Megatron-Core's `IndexedDataset` asserts on a bad header (and then prints a stray traceback
from its ``__del__``), trusts the pointer table, and nothing checks token ids against the
model: an id >= the vocabulary crashes TP = 1 with a raw ``IndexError`` and trains silently
at TP >= 2 (the vocab-parallel embedding zeroes out-of-range rows). Each check here ends in
one `DataError` naming the file:

- `read_index_header`: magic, version, dtype code and the exact ``.idx`` size its counts
  imply, before `IndexedDataset` is constructed;
- `check_pointers`: every sequence pointer equals the cumulative byte length of the
  sequences before it, and the document index is a non-decreasing 0..n table;
- `check_token_range`: the smallest and largest token id of the *whole* ``.bin``, from one
  scan at the memory map's speed (GB/s from the page cache, the storage's speed otherwise; see
  docs/benchmarks.md) cached in a small JSON file keyed by the size and modification time of
  both files, so later launches cost a file read. In a distributed job rank 0 scans (or
  reads the cache) and broadcasts the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType


class DataError(ValueError):
    """The data cannot serve the requested training (too short, bad blend, bad files)."""


INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8
STATS_SUFFIX = ".token_stats.json"
STATS_VERSION = 1
SCAN_CHUNK_TOKENS = 1 << 26
POINTER_CHUNK = 1 << 22


@dataclass(frozen=True)
class IndexHeader:
    """The fixed part of a ``.idx`` file."""

    dtype: type
    sequence_count: int
    document_count: int


def read_index_header(prefix: str) -> IndexHeader:
    """Read and check the header of ``prefix.idx`` against the file's size."""
    path = prefix + ".idx"
    size = os.path.getsize(path)
    with open(path, "rb") as stream:
        raw = stream.read(_HEADER_BYTES)
    where = f"dataset {prefix!r}: {path}"
    if len(raw) < _HEADER_BYTES or raw[:9] != INDEX_MAGIC:
        raise DataError(
            f"{where} is not a Megatron index file (bad or missing header; {size} bytes): "
            "re-run tools/preprocess_data.py"
        )
    version, code, sequences, documents = struct.unpack("<QBQQ", raw[9:])
    if version != INDEX_VERSION:
        raise DataError(f"{where} has index version {version}; only version 1 is supported")
    try:
        dtype = DType.dtype_from_code(code)
    except (KeyError, ValueError) as err:
        raise DataError(f"{where} has unknown token dtype code {code}") from err
    expected = _HEADER_BYTES + sequences * (4 + 8) + documents * 8
    if size != expected:
        raise DataError(
            f"{where} is {size} bytes but its header ({sequences} sequences, {documents} "
            f"document-index entries) implies {expected}: the file is truncated or damaged "
            "(re-run tools/preprocess_data.py)"
        )
    return IndexHeader(dtype, sequences, documents)


def check_pointers(dataset, prefix: str) -> None:
    """Sequence pointers against the cumulative lengths, and the document index table.

    Reads the index in chunks, so memory stays bounded at any number of documents.
    """
    index = dataset.index
    itemsize = np.dtype(index.dtype).itemsize
    lengths, pointers = index.sequence_lengths, index.sequence_pointers
    offset = 0
    for begin in range(0, len(lengths), POINTER_CHUNK):
        sizes = np.asarray(lengths[begin : begin + POINTER_CHUNK], dtype=np.int64) * itemsize
        expected = offset + np.cumsum(sizes) - sizes
        actual = np.asarray(pointers[begin : begin + POINTER_CHUNK], dtype=np.int64)
        wrong = np.flatnonzero(actual != expected)
        if len(wrong):
            i = int(wrong[0])
            raise DataError(
                f"dataset {prefix!r}: {prefix}.idx is inconsistent: sequence {begin + i} "
                f"points at byte {int(actual[i])} of {prefix}.bin but the lengths before it "
                f"add up to byte {int(expected[i])} (damaged or hand-edited index; re-run "
                "tools/preprocess_data.py or tools/merge_datasets.py)"
            )
        offset += int(sizes.sum())
    documents = np.asarray(index.document_indices, dtype=np.int64)
    count = len(lengths)
    if (
        len(documents) == 0
        or documents[0] != 0
        or documents[-1] != count
        or np.any(np.diff(documents) < 0)
    ):
        raise DataError(
            f"dataset {prefix!r}: {prefix}.idx has a document index that is not a "
            f"non-decreasing table from 0 to its {count} sequences (damaged index; re-run "
            "tools/preprocess_data.py)"
        )


@dataclass(frozen=True)
class TokenRange:
    """Smallest and largest token id in a ``.bin`` (0, -1 when it holds no tokens)."""

    low: int
    high: int


def check_token_range(dataset, vocab_size: int, prefix: str, cache_dir: str | None) -> None:
    """Reject a dataset holding a token id outside ``[0, vocab_size)``, naming the document."""
    value = _on_rank_zero(lambda: token_range(dataset, prefix, cache_dir))
    if isinstance(value, str):
        raise DataError(value)
    if value.low >= 0 and value.high < vocab_size:
        return
    doc, doc_low, doc_high = _first_document_outside(dataset, vocab_size)
    bad = doc_high if doc_high >= vocab_size else doc_low
    raise DataError(
        f"dataset {prefix!r}: document {doc} holds token id {bad} but the model's vocabulary "
        f"has {vocab_size} entries (ids in {prefix}.bin range from {value.low} to "
        f"{value.high}; was the data tokenized with another tokenizer, or merged from "
        "datasets of different tokenizers?)"
    )


def token_range(dataset, prefix: str, cache_dir: str | None) -> TokenRange:
    """The whole file's token range, from the cache when it matches the files, else a scan."""
    key = _file_key(prefix)
    for path in _stats_paths(prefix, cache_dir):
        cached = _read_stats(path, key)
        if cached is not None:
            return cached
    value = _scan(dataset)
    for path in _stats_paths(prefix, cache_dir):
        if _write_stats(path, key, value):
            break
    return value


def _scan(dataset) -> TokenRange:
    total = int(np.asarray(dataset.sequence_lengths, dtype=np.int64).sum())
    if total == 0:
        return TokenRange(0, -1)
    tokens = np.memmap(dataset.path_prefix + ".bin", dtype=dataset.index.dtype, mode="r")
    chunk = tokens[:SCAN_CHUNK_TOKENS]
    low, high = int(chunk.min()), int(chunk.max())
    for begin in range(SCAN_CHUNK_TOKENS, total, SCAN_CHUNK_TOKENS):
        chunk = tokens[begin : begin + SCAN_CHUNK_TOKENS]
        low, high = min(low, int(chunk.min())), max(high, int(chunk.max()))
    return TokenRange(low, high)


def _first_document_outside(dataset, vocab_size: int) -> tuple[int, int, int]:
    """(document, its smallest id, its largest id) of the first document with a bad id."""
    tokens = np.memmap(dataset.path_prefix + ".bin", dtype=dataset.index.dtype, mode="r")
    itemsize = np.dtype(dataset.index.dtype).itemsize
    for begin in range(0, len(tokens), SCAN_CHUNK_TOKENS):
        chunk = tokens[begin : begin + SCAN_CHUNK_TOKENS].astype(np.int64)
        bad = np.flatnonzero((chunk < 0) | (chunk >= vocab_size))
        if len(bad):
            byte = (begin + int(bad[0])) * itemsize
            pointers = dataset.index.sequence_pointers
            doc = int(np.searchsorted(pointers, byte, side="right")) - 1
            values = np.asarray(dataset.get(doc), dtype=np.int64)
            return doc, int(values.min()), int(values.max())
    raise AssertionError("a token outside the vocabulary was reported but not found")


def _file_key(prefix: str) -> dict:
    key = {}
    for ext in (".bin", ".idx"):
        stat = os.stat(prefix + ext)
        key[ext[1:]] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return key


def _stats_paths(prefix: str, cache_dir: str | None) -> list[str]:
    """Beside the dataset first, then in ``--data-cache-path`` (datasets are often read-only)."""
    paths = [prefix + STATS_SUFFIX]
    if cache_dir:
        digest = hashlib.sha1(os.path.abspath(prefix).encode()).hexdigest()[:16]
        paths.append(os.path.join(cache_dir, f"{digest}-{os.path.basename(prefix)}{STATS_SUFFIX}"))
    return paths


def _read_stats(path: str, key: dict) -> TokenRange | None:
    try:
        with open(path) as stream:
            stats = json.load(stream)
        if stats.get("version") != STATS_VERSION or stats.get("files") != key:
            return None
        return TokenRange(int(stats["min_token_id"]), int(stats["max_token_id"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing, stale or damaged: scan again


def _write_stats(path: str, key: dict, value: TokenRange) -> bool:
    """Write the cache atomically; False when the directory is not writable."""
    stats = {
        "version": STATS_VERSION,
        "files": key,
        "min_token_id": value.low,
        "max_token_id": value.high,
    }
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w") as stream:
            json.dump(stats, stream)
        os.replace(tmp, path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False


def _on_rank_zero(compute):
    """``compute()`` on global rank 0, broadcast to every rank (a `DataError` as its message)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_world_size() == 1:
        try:
            return compute()
        except DataError as err:
            return str(err)
    payload = [None]
    if torch.distributed.get_rank() == 0:
        try:
            payload[0] = compute()
        except DataError as err:
            payload[0] = str(err)
        except Exception as err:  # do not leave the other ranks waiting in the broadcast
            payload[0] = f"reading the dataset failed on rank 0: {err!r}"
    torch.distributed.broadcast_object_list(payload, src=0)
    return payload[0]
