"""Concatenate Megatron-Core indexed datasets (``.bin``/``.idx`` pairs) into one.

Usage::

    python tools/merge_datasets.py --input out/a_text_document out/b_text_document \
        --output-prefix out/merged_text_document
    python tools/merge_datasets.py --input-dir out/parts --output-prefix out/merged_text_document

Documents keep their order and boundaries (inputs are taken in the given order, or in
sorted name order with ``--input-dir``). All inputs must share one token dtype. The output
is written under temporary names and renamed into place (``.bin`` first, ``.idx`` last)
only once complete, so a failed run never leaves a partial dataset or touches an old one.
This module also holds the output helpers that ``preprocess_data.py`` shares.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType, TracebackType

INDEX_HEADER_SIZE = 9 + 8  # magic bytes + version, followed by the one-byte dtype code


class ToolError(Exception):
    """A failure reported to the user as ``error: <message>`` with exit code 1."""


def indexed_dataset() -> ModuleType:
    """Import ``megatron.core.datasets.indexed_dataset`` on first use.

    Importing ``megatron.core`` takes seconds (it pulls in torch and the whole package), so
    the tools validate their arguments first and import it only when there is work to do.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron.core.datasets import indexed_dataset as module
    return module


def check_output_prefix(prefix: str) -> None:
    """Fail unless ``prefix`` names a file prefix inside an existing, writable directory."""
    if not prefix or prefix.endswith(os.sep):
        raise ToolError(f"output prefix must name a file prefix, not a directory: {prefix!r}")
    directory = os.path.dirname(prefix) or "."
    if not os.path.exists(directory):
        raise ToolError(f"output directory does not exist: {directory}")
    if not os.path.isdir(directory):
        raise ToolError(f"output directory is not a directory: {directory}")
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise ToolError(f"output directory is not writable: {directory} ({exc.strerror})") from exc


class AtomicOutputs:
    """Files written under temporary names, renamed into place only by ``commit``.

    Used as a context manager: leaving the block without ``commit`` (an error, Ctrl-C)
    removes every temporary and scratch file, so existing outputs stay untouched.
    """

    def __init__(self) -> None:
        self._renames: list[tuple[str, str]] = []
        self._scratch: list[str] = []

    def temporary(self, final_path: str) -> str:
        """Return the temporary path that ``commit`` will rename to ``final_path``."""
        temporary = f"{final_path}.tmp-{os.getpid()}"
        self._renames.append((temporary, final_path))
        return temporary

    def scratch(self, path: str) -> str:
        """Register an intermediate file that is removed in every case."""
        self._scratch.append(path)
        return path

    def commit(self) -> None:
        """Rename all temporaries into place, ``.idx`` files last."""
        for temporary, final_path in sorted(self._renames, key=lambda r: r[1].endswith(".idx")):
            os.replace(temporary, final_path)
        self._renames.clear()

    def __enter__(self) -> AtomicOutputs:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Remove the scratch files, and the temporaries unless committed."""
        for path in [temporary for temporary, _ in self._renames] + self._scratch:
            Path(path).unlink(missing_ok=True)


def dataset_prefixes_in(directory: str) -> list[str]:
    """Prefixes of all complete ``.bin``/``.idx`` pairs in ``directory``, sorted by name."""
    if not os.path.isdir(directory):
        raise ToolError(f"input directory does not exist: {directory}")
    prefixes = sorted(
        str(path.with_suffix(""))
        for path in Path(directory).glob("*.idx")
        if path.with_suffix(".bin").is_file()
    )
    if not prefixes:
        raise ToolError(f"input directory holds no .bin/.idx datasets: {directory}")
    return prefixes


def check_dataset_exists(prefix: str) -> None:
    """Fail unless both files of the dataset at ``prefix`` exist."""
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise ToolError(f"dataset not found: {prefix} (missing {prefix}{suffix})")


def read_dtype_code(prefix: str) -> int:
    """Read the token dtype code from the header of ``prefix.idx``."""
    with open(prefix + ".idx", "rb") as index:
        header = index.read(INDEX_HEADER_SIZE + 1)
    if len(header) <= INDEX_HEADER_SIZE or not header.startswith(b"MMIDIDX"):
        raise ToolError(f"not a Megatron index file: {prefix}.idx")
    return struct.unpack("<B", header[INDEX_HEADER_SIZE:])[0]


def common_dtype(prefixes: list[str]) -> type:
    """The numpy dtype shared by all datasets; fail naming the first one that differs."""
    dtype_from_code = indexed_dataset().DType.dtype_from_code
    first = dtype_from_code(read_dtype_code(prefixes[0]))
    for prefix in prefixes[1:]:
        dtype = dtype_from_code(read_dtype_code(prefix))
        if dtype is not first:
            raise ToolError(
                f"dtype mismatch: {prefixes[0]} holds {first.__name__} tokens "
                f"but {prefix} holds {dtype.__name__}"
            )
    return first


def merge_into(
    output_prefix: str, prefixes: list[str], dtype: type, outputs: AtomicOutputs
) -> None:
    """Concatenate the datasets at ``prefixes`` into temporaries of ``output_prefix``."""
    module = indexed_dataset()
    builder = module.IndexedDatasetBuilder(outputs.temporary(output_prefix + ".bin"), dtype=dtype)
    for prefix in prefixes:
        try:
            builder.add_index(prefix)
        except (OSError, ValueError, AssertionError, struct.error) as exc:
            raise ToolError(f"cannot read dataset {prefix}: {exc!r}") from exc
    builder.finalize(outputs.temporary(output_prefix + ".idx"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input",
        nargs="+",
        metavar="PREFIX",
        help="dataset prefixes (without .bin/.idx), merged in this order",
    )
    source.add_argument(
        "--input-dir",
        metavar="DIR",
        help="merge every .bin/.idx dataset in DIR, in sorted name order",
    )
    parser.add_argument(
        "--output-prefix", required=True, help="prefix of the merged dataset (without .bin/.idx)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prefixes = args.input or dataset_prefixes_in(args.input_dir)
        for prefix in prefixes:
            check_dataset_exists(prefix)
        check_output_prefix(args.output_prefix)
        dtype = common_dtype(prefixes)
        with AtomicOutputs() as outputs:
            merge_into(args.output_prefix, prefixes, dtype, outputs)
            outputs.commit()
    except ToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"merged {len(prefixes)} datasets into {args.output_prefix}.bin/.idx "
        f"({dtype.__name__} tokens)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
