"""Tests of tools/merge_datasets.py.

Merges run in this process (a fresh interpreter spends ~5 s importing ``megatron.core``);
argument checks that fail before the import run the script through a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.tool_import import import_tool

TOOLS = Path(__file__).resolve().parents[1] / "tools"


merge_datasets = import_tool("merge_datasets")

FIRST = [[5, 6, 7, 0], [8, 0]]
SECOND = [[1, 2, 3, 4, 0], [9, 0], [10, 11, 0]]


def write_dataset(prefix: Path, documents: list[list[int]], dtype: type = np.uint16) -> Path:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for document in documents:
        builder.add_document(np.array(document, dtype=dtype), [len(document)])
    builder.finalize(f"{prefix}.idx")
    return prefix


def read_dataset(prefix: Path) -> tuple[list[list[int]], type]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    assert list(dataset.document_indices) == list(range(len(dataset) + 1))
    return [dataset[i].tolist() for i in range(len(dataset))], dataset.index.dtype


def run_main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = merge_datasets.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(TOOLS / "merge_datasets.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_merge_equals_concatenation(tmp_path, capsys):
    first = write_dataset(tmp_path / "first", FIRST)
    second = write_dataset(tmp_path / "second", SECOND)

    code, out, err = run_main(
        capsys, "--input", str(second), str(first), "--output-prefix", str(tmp_path / "merged")
    )

    assert code == 0, err
    assert "merged 2 datasets" in out
    assert read_dataset(tmp_path / "merged") == (SECOND + FIRST, np.uint16)
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_merge_input_dir_takes_datasets_in_name_order(tmp_path, capsys):
    parts = tmp_path / "parts"
    parts.mkdir()
    write_dataset(parts / "b", SECOND, np.int32)
    write_dataset(parts / "a", FIRST, np.int32)
    (parts / "stray.idx").write_bytes(b"an index without its .bin is ignored")

    code, _, err = run_main(
        capsys, "--input-dir", str(parts), "--output-prefix", str(tmp_path / "merged")
    )

    assert code == 0, err
    assert read_dataset(tmp_path / "merged") == (FIRST + SECOND, np.int32)


def test_dtype_mismatch_fails_and_keeps_existing_output(tmp_path, capsys):
    small = write_dataset(tmp_path / "small", FIRST, np.uint16)
    large = write_dataset(tmp_path / "large", SECOND, np.int32)
    old = write_dataset(tmp_path / "merged", [[42, 0]])
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}

    code, _, err = run_main(capsys, "--input", str(small), str(large), "--output-prefix", str(old))

    assert code == 1
    assert f"error: dtype mismatch: {small} holds uint16 tokens but {large} holds int32" in err
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_unreadable_dataset_fails_and_leaves_no_temporary_files(tmp_path, capsys):
    first = write_dataset(tmp_path / "first", FIRST)
    broken = tmp_path / "broken"
    Path(f"{broken}.bin").write_bytes(b"")
    Path(f"{broken}.idx").write_bytes(b"MMIDIDX\x00\x00" + (1).to_bytes(8, "little") + b"\x08")
    before = sorted(tmp_path.iterdir())

    code, _, err = run_main(
        capsys, "--input", str(first), str(broken), "--output-prefix", str(tmp_path / "merged")
    )

    assert code == 1
    assert f"error: cannot read dataset {broken}: " in err
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--input", "{tmp}/missing"],
            "error: dataset not found: {tmp}/missing (missing {tmp}/missing.bin)",
        ),
        (["--input-dir", "{tmp}/nodir"], "error: input directory does not exist: {tmp}/nodir"),
        (["--input-dir", "{tmp}"], "error: input directory holds no .bin/.idx datasets: {tmp}"),
    ],
)
def test_bad_inputs_fail_before_any_work(tmp_path, args, message):
    args = [arg.format(tmp=tmp_path) for arg in args]
    result = run_cli(*args, "--output-prefix", str(tmp_path / "merged"))
    assert result.returncode == 1
    assert message.format(tmp=tmp_path) in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_input_and_input_dir_are_exclusive(tmp_path):
    result = run_cli("--input", "a", "--input-dir", "b", "--output-prefix", str(tmp_path / "m"))
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr
