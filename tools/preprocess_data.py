"""Tokenize JSONL documents into Megatron-Core indexed datasets (``.bin``/``.idx``).

A Megatron-LM compatible ``tools/preprocess_data.py``: every input line is a JSON object,
and for each ``--json-keys`` key the tool writes ``{output_prefix}_{key}_document.bin/.idx``
through ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder``, one document per
line, readable by ``IndexedDataset`` and ``GPTDataset``. Example::

    python tools/preprocess_data.py --input data/sample/train.jsonl.gz \
        --output-prefix data/processed/sample_train \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/sample/tokenizer.json \
        --append-eod --workers 2

``--input`` is a ``.jsonl``/``.json`` file (optionally ``.gz`` or ``.zst`` compressed), a
directory of such files or a glob; files are read in sorted order. Output does not depend on
``--workers`` or ``--partitions``: documents always keep their input order. Lines that are
not valid UTF-8, not a JSON object, lack a key, or have an empty or non-string value are
skipped and reported with ``file:line`` (``--strict`` stops at the first one instead). A
line skipped for one key is skipped for all keys, so the datasets stay aligned. Outputs are
written under temporary names and renamed into place only on success.
"""

from __future__ import annotations

import argparse
import errno
import glob
import gzip
import io
import itertools
import json
import multiprocessing
import os
import signal
import sys
import time
import zlib
from collections import Counter
from collections.abc import Generator, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import numpy as np
from merge_datasets import (
    AtomicOutputs,
    ToolError,
    check_output_prefix,
    indexed_dataset,
    merge_into,
)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tst_megatron.data.tokenizer import (  # noqa: E402
    TOKENIZER_TYPES,
    TokenizerError,
    TokenizerSpec,
    build_tokenizer,
    require_eod,
)

INPUT_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
WINDOW_LINES = 1024  # lines handed to the worker pool at once; bounds memory use
CHUNKSIZE = 32  # lines per worker task
LISTED_PER_REASON = 10  # skipped lines listed individually per reason
MB = 1e6


# ---------------------------------------------------------------------------- input


def resolve_inputs(spec: str) -> list[str]:
    """Expand ``--input`` (a file, a directory or a glob) to a sorted list of files."""
    if os.path.isfile(spec):
        paths = [spec]
    elif os.path.isdir(spec):
        paths = sorted(
            str(p) for p in Path(spec).iterdir() if p.is_file() and p.name.endswith(INPUT_SUFFIXES)
        )
        if not paths:
            raise ToolError(f"input directory holds no {'/'.join(INPUT_SUFFIXES)} files: {spec}")
    elif any(char in spec for char in "*?["):
        paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not paths:
            raise ToolError(f"input glob matches no files: {spec}")
    else:
        raise ToolError(f"input not found: {spec}")
    for path in paths:
        if path.endswith(".zst"):
            import_zstandard(path)
    return paths


def import_zstandard(path: str) -> ModuleType:
    """Import ``zstandard``, failing with an install hint naming ``path``."""
    try:
        import zstandard
    except ImportError:
        raise ToolError(
            f"reading {path} needs the 'zstandard' package: pip install zstandard"
        ) from None
    return zstandard


def open_input(path: str) -> io.BufferedIOBase:
    """Open an input file for reading binary lines, decompressing ``.gz``/``.zst``."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        compressed = open(path, "rb")  # noqa: SIM115 - the reader closes it (closefd=True)
        reader = (
            import_zstandard(path)
            .ZstdDecompressor()
            .stream_reader(compressed, read_across_frames=True, closefd=True)
        )
        return io.BufferedReader(reader)
    return open(path, "rb")


def read_errors() -> tuple[type[Exception], ...]:
    """Exceptions meaning that an input file cannot be read or decompressed."""
    try:
        from zstandard import ZstdError
    except ImportError:
        return (OSError, EOFError, zlib.error)
    return (OSError, EOFError, zlib.error, ZstdError)


def iter_lines(paths: list[str]) -> Iterator[tuple[str, bytes]]:
    """Yield ``("file:line", raw bytes)`` for every line of every input file."""
    for path in paths:
        try:
            with open_input(path) as lines:
                for number, line in enumerate(lines, start=1):
                    yield f"{path}:{number}", line
        except read_errors() as exc:
            raise ToolError(f"cannot read {path}: {exc}") from exc


# ---------------------------------------------------------------------------- tokens


def token_dtype(vocab_size: int) -> type[np.integer]:
    """``uint16`` when every token id fits (ids < vocab_size <= 65536), else ``int32``.

    This is the rule ``GPTDatasetConfig`` uses to infer the dtype of a dataset;
    ``DType.optimal_dtype`` switches to int32 at 65500 already and would disagree with it.
    """
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


# ---------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class EncodeConfig:
    """What every encoder (in this process or a worker) needs; picklable."""

    tokenizer: TokenizerSpec
    keys: tuple[str, ...]
    append_eod: bool
    dtype: type[np.integer]


class Skip(NamedTuple):
    """Why a line was skipped: a summary ``reason`` and the ``detail`` for this line."""

    reason: str
    detail: str


class Encoder:
    """Turns one raw input line into one token array per key, or a ``Skip``."""

    def __init__(self, config: EncodeConfig) -> None:
        self.config = config
        self.tokenizer = build_tokenizer(config.tokenizer)
        self.eod = (
            require_eod(self.tokenizer, config.tokenizer, "--append-eod")
            if config.append_eod
            else None
        )

    def __call__(self, line: bytes) -> list[np.ndarray] | Skip:
        line = line.rstrip(b"\r\n")
        if not line.strip():
            return Skip("blank line", "blank line")
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            return Skip("invalid UTF-8", f"invalid UTF-8: {exc}")
        except json.JSONDecodeError as exc:
            return Skip("malformed JSON", f"malformed JSON: {exc}")
        if not isinstance(record, dict):
            return Skip(
                "malformed JSON", f"malformed JSON: expected an object, got {type(record).__name__}"
            )
        texts = []
        for key in self.config.keys:
            if key not in record:
                return Skip("missing key", f"missing key {key!r}")
            if not isinstance(record[key], str):
                return Skip(
                    "not a string",
                    f"value of key {key!r} is {type(record[key]).__name__}, not a string",
                )
            if not record[key].strip():
                return Skip("empty text", f"empty text for key {key!r}")
            texts.append(record[key])
        try:
            return [self._tokens(text) for text in texts]
        except TokenizerError as exc:  # NullTokenizer: text that is not token ids
            return Skip("not token ids", str(exc))

    def _tokens(self, text: str) -> np.ndarray:
        ids = self.tokenizer.tokenize(text)
        if self.eod is not None:
            ids.append(self.eod)
        return np.array(ids, dtype=self.config.dtype)


_worker_encoder: Encoder | None = None


def _quiet_interrupt() -> None:
    """In a worker process: ignore Ctrl-C (SIGINT to the whole process group); the main
    process reports it once, terminates the workers and removes the partial outputs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start_worker(config: EncodeConfig) -> None:
    global _worker_encoder
    _quiet_interrupt()
    _worker_encoder = Encoder(config)


def _encode_in_worker(line: bytes) -> list[np.ndarray] | Skip:
    assert _worker_encoder is not None  # the pool's initializer, _start_worker, sets it
    return _worker_encoder(line)


class Encoded(NamedTuple):
    """One input line after encoding."""

    location: str
    size: int
    result: list[np.ndarray] | Skip


def encode_lines(
    lines: Iterator[tuple[str, bytes]], config: EncodeConfig, workers: int
) -> Generator[Encoded, None, None]:
    """Yield ``(location, line size, result)`` in input order, using ``workers`` processes.

    Lines go to the pool one window at a time (the next window is submitted before the
    current one is consumed), so memory stays bounded however large the input is.
    """
    if workers == 1:
        encoder = Encoder(config)
        for location, line in lines:
            yield Encoded(location, len(line), encoder(line))
        return
    with multiprocessing.Pool(workers, initializer=_start_worker, initargs=(config,)) as pool:
        pending: list[tuple[list[tuple[str, bytes]], Iterator]] = []
        for window in iter(lambda: list(itertools.islice(lines, WINDOW_LINES)), []):
            payload = [line for _, line in window]
            pending.append((window, pool.imap(_encode_in_worker, payload, CHUNKSIZE)))
            if len(pending) == 2:
                yield from _paired(*pending.pop(0))
        for window, results in pending:
            yield from _paired(window, results)


def _paired(window: list[tuple[str, bytes]], results: Iterator) -> Iterator[Encoded]:
    for (location, line), result in zip(window, results, strict=True):
        yield Encoded(location, len(line), result)


# ---------------------------------------------------------------------------- writing


@dataclass
class Stats:
    """Counters of one run (or one partition)."""

    keys: tuple[str, ...]
    lines: int = 0
    documents: int = 0
    bytes: int = 0
    tokens: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def add(self, other: Stats) -> None:
        self.lines += other.lines
        self.documents += other.documents
        self.bytes += other.bytes
        self.tokens.update(other.tokens)
        self.skipped.update(other.skipped)


@dataclass(frozen=True)
class Job:
    """Everything a (partition) process needs to write datasets; picklable."""

    inputs: list[str]
    encode: EncodeConfig
    strict: bool
    log_interval: int


def write_datasets(
    lines: Iterator[tuple[str, bytes]],
    paths: list[tuple[str, str]],
    job: Job,
    workers: int,
    label: str = "",
) -> Stats:
    """Encode ``lines`` into one dataset per key, at the given ``(bin, idx)`` paths."""
    builder_class = indexed_dataset().IndexedDatasetBuilder
    builders = [builder_class(bin_path, dtype=job.encode.dtype) for bin_path, _ in paths]
    stats = Stats(job.encode.keys)
    start = time.monotonic()
    with closing(encode_lines(lines, job.encode, workers)) as encoded:  # closes the pool
        for location, size, result in encoded:
            stats.lines += 1
            stats.bytes += size
            if isinstance(result, Skip):
                record_skip(stats, location, result, job.strict)
            else:
                for key, builder, tokens in zip(job.encode.keys, builders, result, strict=True):
                    builder.add_document(tokens, [tokens.size])
                    stats.tokens[key] += tokens.size
                stats.documents += 1
            if stats.lines % job.log_interval == 0:
                log_progress(stats, time.monotonic() - start, label)
    for builder, (_, idx_path) in zip(builders, paths, strict=True):
        builder.finalize(idx_path)
    return stats


def record_skip(stats: Stats, location: str, skip: Skip, strict: bool) -> None:
    """Count a skipped line and list it (the first few per reason); raise if ``strict``."""
    if strict:
        raise ToolError(f"{location}: {skip.detail} (--strict)")
    stats.skipped[skip.reason] += 1
    if stats.skipped[skip.reason] <= LISTED_PER_REASON:
        print(f"warning: {location}: {skip.detail}; line skipped", file=sys.stderr)
    if stats.skipped[skip.reason] == LISTED_PER_REASON:
        print(f"warning: further '{skip.reason}' lines are counted, not listed", file=sys.stderr)


def log_progress(stats: Stats, elapsed: float, label: str) -> None:
    elapsed = max(elapsed, 1e-9)
    print(
        f"{label}processed {stats.lines} documents "
        f"({stats.lines / elapsed:.1f} docs/s, {stats.bytes / MB / elapsed:.2f} MB/s)",
        file=sys.stderr,
    )


def run_partition(
    job: Job, index: int, start: int, stop: int, paths: list[tuple[str, str]], workers: int
) -> Stats:
    """Write input lines ``[start, stop)`` (counted over all input files) to ``paths``."""
    lines = itertools.islice(iter_lines(job.inputs), start, stop)
    return write_datasets(lines, paths, job, workers, label=f"partition {index}: ")


def write_partitioned(
    job: Job, finals: list[str], outputs: AtomicOutputs, partitions: int, workers: int
) -> Stats:
    """Write contiguous line ranges in parallel processes, then merge them in order."""
    total = sum(1 for _ in iter_lines(job.inputs))
    bounds = [total * i // partitions for i in range(partitions + 1)]
    part_prefixes = [
        [f"{final}.part{i}-tmp-{os.getpid()}" for final in finals] for i in range(partitions)
    ]
    stats = Stats(job.encode.keys)
    executor = ProcessPoolExecutor(partitions, initializer=_quiet_interrupt)
    try:
        futures = [
            executor.submit(
                run_partition,
                job,
                i,
                bounds[i],
                bounds[i + 1],
                [(outputs.scratch(p + ".bin"), outputs.scratch(p + ".idx")) for p in prefixes],
                workers // partitions,
            )
            for i, prefixes in enumerate(part_prefixes)
        ]
        for future in futures:
            stats.add(future.result())
    except BaseException:  # a failed partition, Ctrl-C: stop the others now, not at their end
        for process in list(getattr(executor, "_processes", {}).values()):
            process.terminate()
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    executor.shutdown()
    for k, final in enumerate(finals):
        merge_into(final, [prefixes[k] for prefixes in part_prefixes], job.encode.dtype, outputs)
    return stats


# ---------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input",
        required=True,
        help="a .jsonl/.json(.gz/.zst) file, a directory of them, or a glob",
    )
    group.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="keys to extract; one dataset per key (default: text)",
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument(
        "--tokenizer-model", help="tokenizer.json (or its directory), or a SentencePiece model"
    )
    group.add_argument("--vocab-file", help="GPT-2 vocab.json (GPT2BPETokenizer)")
    group.add_argument("--merge-file", help="GPT-2 merges.txt (GPT2BPETokenizer)")
    group.add_argument(
        "--vocab-size",
        type=int,
        help="NullTokenizer: ids are the text's integers below this; EOD is the last id",
    )
    group.add_argument(
        "--append-eod",
        action="store_true",
        help="append the end-of-document token to every document",
    )
    group = parser.add_argument_group("output data")
    group.add_argument(
        "--output-prefix",
        required=True,
        help="writes {prefix}_{key}_document.bin/.idx for every key",
    )
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes in all")
    group.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="parallel partitions of the input, merged at the end; "
        "--workers must be a multiple of it",
    )
    group.add_argument(
        "--log-interval", type=int, default=1000, help="print progress every this many documents"
    )
    group.add_argument(
        "--strict",
        action="store_true",
        help="fail on the first bad input line instead of skipping it",
    )
    args = parser.parse_args(argv)
    for name in ("workers", "partitions", "log_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers % args.partitions:
        parser.error(
            f"--workers ({args.workers}) must be a multiple of --partitions ({args.partitions})"
        )
    if args.vocab_size is not None and args.tokenizer_type != "NullTokenizer":
        parser.error(
            f"--vocab-size is for --tokenizer-type NullTokenizer; {args.tokenizer_type} "
            "has its own vocabulary"
        )
    if len(set(args.json_keys)) != len(args.json_keys):
        parser.error(f"--json-keys has duplicates: {' '.join(args.json_keys)}")
    return args


def prepare_job(args: argparse.Namespace) -> Job:
    """Check inputs, output location and tokenizer before any work; fail on the first."""
    inputs = resolve_inputs(args.input)
    check_output_prefix(args.output_prefix)
    spec = TokenizerSpec(
        args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file, args.vocab_size
    )
    try:
        tokenizer = build_tokenizer(spec)
        if args.append_eod:
            require_eod(tokenizer, spec, "--append-eod")
    except TokenizerError as exc:
        raise ToolError(str(exc)) from exc
    config = EncodeConfig(
        spec, tuple(args.json_keys), args.append_eod, token_dtype(tokenizer.vocab_size)
    )
    return Job(inputs, config, args.strict, args.log_interval)


def print_summary(stats: Stats, finals: list[str], dtype: type, elapsed: float) -> None:
    for key, final in zip(stats.keys, finals, strict=True):
        print(
            f"wrote {stats.documents} documents, {stats.tokens[key]} tokens "
            f"({dtype.__name__}) to {final}.bin/.idx"
        )
    if stats.skipped:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(stats.skipped.items()))
        print(f"skipped {sum(stats.skipped.values())} of {stats.lines} lines ({reasons})")
    elapsed = max(elapsed, 1e-9)
    print(
        f"throughput: {stats.bytes / MB:.2f} MB in {elapsed:.2f} s = "
        f"{stats.bytes / MB / elapsed:.2f} MB/s, "
        f"{sum(stats.tokens.values()) / elapsed:.0f} tokens/s"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        job = prepare_job(args)
        indexed_dataset()  # the slow import, kept out of the timing
        finals = [f"{args.output_prefix}_{key}_document" for key in args.json_keys]
        start = time.monotonic()
        with AtomicOutputs() as outputs:
            if args.partitions == 1:
                paths = [
                    (outputs.temporary(f + ".bin"), outputs.temporary(f + ".idx")) for f in finals
                ]
                stats = write_datasets(iter_lines(job.inputs), paths, job, args.workers)
            else:
                stats = write_partitioned(job, finals, outputs, args.partitions, args.workers)
            if stats.documents == 0:
                raise ToolError(
                    f"no documents to write: all {stats.lines} input lines were skipped"
                )
            outputs.commit()
    except ToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # reading errors are ToolErrors: this is the output
        name = errno.errorcode.get(exc.errno or 0, "")
        what = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename else ""
        print(
            f"error: cannot write the outputs under {args.output_prefix}: {what}{where}"
            f"{f' [{name}]' if name else ''}; the partial outputs were removed",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("interrupted (SIGINT): the partial outputs were removed", file=sys.stderr)
        return 130
    print_summary(stats, finals, job.encode.dtype, time.monotonic() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
