"""Data checks that used to miss (issue 15, defects 5 and 7), provoked as a user meets them.

- a corpus merged from datasets of two tokenizers: ids >= the vocabulary in a few documents
  that the old 64-document sample skipped; at TP = 2 the vocab-parallel embedding masks such
  ids and the run trained silently. Now a real ``torchrun`` launch ends before training with
  one error line naming the file and the document, exit code 1;
- a ``.idx`` whose pointer table is shifted (it still describes the ``.bin``'s size);
- a truncated / damaged ``.idx``: one error line and no stray ``IndexedDataset.__del__``
  traceback;
- blend weights ``nan`` / ``inf``;
- the whole-file token range is cached beside the dataset (or in ``--data-cache-path``) and a
  changed file invalidates the cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support.multirank import free_port
from tests.tool_import import import_tool
from tst_megatron.data import checks
from tst_megatron.data.builders import open_indexed_dataset, parse_blend
from tst_megatron.data.checks import DataError
from tst_megatron.testing.datasets import write_documents as write_dataset

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 512
LAUNCH = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--transformer-impl", "local", "--distributed-backend", "gloo",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3",
    "--train-iters", "4", "--eval-iters", "0", "--tokenizer-type", "NullTokenizer",
    "--vocab-size", str(VOCAB), "--split", "100,0,0",
]  # fmt: skip
ERROR = "pretrain_tst.py: error: "


def random_documents(count: int, high: int, seed: int) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [list(rng.randint(0, high, rng.randint(20, 60))) for _ in range(count)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("checks")
    good = write_dataset(tmp / "good", random_documents(150, VOCAB, 0))
    other_tokenizer = write_dataset(tmp / "other", random_documents(2, 600, 1))  # ids to 599
    tail = write_dataset(tmp / "tail", random_documents(150, VOCAB, 2))
    merged = str(tmp / "merged")
    code = import_tool("merge_datasets").main(
        ["--input", good, other_tokenizer, tail, "--output-prefix", merged]
    )
    assert code == 0
    return {"good": good, "merged": merged, "dir": str(tmp)}


def launch(tmp: str, name: str, data: list[str], nproc: int, extra: list[str] = ()):
    metrics = Path(tmp) / f"{name}.jsonl"
    script = str(ROOT / "pretrain_tst.py")
    port = str(free_port())
    args = [*LAUNCH, "--data-path", *data, "--metrics-jsonl", str(metrics), *extra]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, script, *args]
        env |= {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--master-port", port, script, *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp)
    return proc.returncode, proc.stdout + proc.stderr, metrics.exists()


def test_merged_corpus_with_foreign_ids_stops_a_tp2_launch_before_training(data):
    prefix = data["merged"]
    old_sample = np.linspace(0, 301, num=64, dtype=np.int64)  # what the 64-document check read
    assert not {150, 151} & set(old_sample.tolist())
    code, log, trained = launch(
        data["dir"], "merged_tp2", [prefix], 2, ["--tensor-model-parallel-size", "2"]
    )
    assert code == 1 and not trained, log[-3000:]
    line = f"{ERROR}dataset {prefix!r}: document 150 holds token id "
    errors = [row for row in log.splitlines() if row.startswith(ERROR)]
    assert errors and all(row.startswith(line) for row in errors), log[-3000:]
    assert f"but the model's vocabulary has {VOCAB} entries (ids in {prefix}.bin range" in log
    assert "IndexError" not in log and 'pretrain_tst.py", line' not in log  # only torchrun's



def test_damaged_index_is_one_line_without_a_stray_traceback(data):
    prefix = Path(data["dir"]) / "truncated"
    shutil.copy(data["good"] + ".bin", f"{prefix}.bin")
    shutil.copy(data["good"] + ".idx", f"{prefix}.idx")
    size = os.path.getsize(f"{prefix}.idx")
    os.truncate(f"{prefix}.idx", size - 100)  # the copy was cut short
    code, log, trained = launch(data["dir"], "truncated", [str(prefix)], 1)
    assert code == 1 and not trained
    assert log.strip().splitlines()[-1] == (
        f"{ERROR}dataset {str(prefix)!r}: {prefix}.idx is {size - 100} bytes but its header "
        f"(150 sequences, 151 document-index entries) implies {size}: the file is truncated "
        "or damaged (re-run tools/preprocess_data.py)"
    )
    assert "Traceback" not in log and "Exception ignored" not in log


def test_damaged_header_is_rejected(data, tmp_path):
    prefix = tmp_path / "garbled"
    shutil.copy(data["good"] + ".bin", f"{prefix}.bin")
    shutil.copy(data["good"] + ".idx", f"{prefix}.idx")
    with open(f"{prefix}.idx", "r+b") as idx:
        idx.write(b"NOTANIDX\x00")
    with pytest.raises(DataError, match=r"garbled\.idx is not a Megatron index file"):
        open_indexed_dataset(str(prefix))


def test_shifted_pointer_table_is_rejected(data, tmp_path):
    prefix = tmp_path / "shifted"
    shutil.copy(data["good"] + ".bin", f"{prefix}.bin")
    shutil.copy(data["good"] + ".idx", f"{prefix}.idx")
    count = 150
    offset = 34 + 4 * count  # header, then int32 lengths, then int64 pointers
    with open(f"{prefix}.idx", "r+b") as idx:
        idx.seek(offset)
        pointers = np.frombuffer(idx.read(8 * count), dtype=np.int64).copy()
        pointers[75:] += 8  # two int32 tokens: documents 75.. read misaligned
        idx.seek(offset)
        idx.write(pointers.tobytes())
    with pytest.raises(DataError) as info:
        open_indexed_dataset(str(prefix))
    assert str(info.value) == (
        f"dataset {str(prefix)!r}: {prefix}.idx is inconsistent: sequence 75 points at byte "
        f"{int(pointers[75])} of {prefix}.bin but the lengths before it add up to byte "
        f"{int(pointers[75]) - 8} (damaged or hand-edited index; re-run "
        "tools/preprocess_data.py or tools/merge_datasets.py)"
    )


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf"])
def test_non_finite_blend_weights_are_rejected(data, weight):
    with pytest.raises(DataError) as info:
        parse_blend([weight, data["good"], "1", data["good"]], "--data-path")
    assert str(info.value) == (
        f"--data-path: blend weights must be finite positive numbers, got ['{weight}', '1']"
    )


def test_token_range_is_cached_and_a_changed_file_invalidates_it(data, tmp_path, monkeypatch):
    prefix = tmp_path / "cached"
    write_dataset(prefix, [[1, 2, 3], [4, 5, 500]])
    stats = Path(f"{prefix}{checks.STATS_SUFFIX}")
    open_indexed_dataset(str(prefix), VOCAB)
    cached = json.loads(stats.read_text())
    assert (cached["min_token_id"], cached["max_token_id"]) == (1, 500)

    scans = []
    real_scan = checks._scan
    monkeypatch.setattr(checks, "_scan", lambda dataset: scans.append(1) or real_scan(dataset))
    open_indexed_dataset(str(prefix), VOCAB)
    assert scans == []  # the second launch reads the cache
    write_dataset(prefix, [[1, 2, 3], [4, 5, 511]])  # rewritten: size the same, new mtime
    os.utime(f"{prefix}.bin", ns=(1, 1))
    open_indexed_dataset(str(prefix), VOCAB)
    assert scans == [1] and json.loads(stats.read_text())["max_token_id"] == 511
    stats.write_text("{truncated")  # a damaged cache is ignored and rewritten
    with pytest.raises(DataError, match=r"document 1 holds token id 511 .* has 500 entries"):
        open_indexed_dataset(str(prefix), 500)


def test_read_only_dataset_caches_in_the_data_cache_path(tmp_path, monkeypatch):
    prefix = tmp_path / "readonly" / "data"
    prefix.parent.mkdir()
    write_dataset(prefix, [[1, 2, 3]])
    real_write = checks._write_stats

    def no_write_beside_the_data(path, key, value):
        if path.startswith(str(prefix.parent)):
            return False  # as on a read-only dataset mount
        return real_write(path, key, value)

    monkeypatch.setattr(checks, "_write_stats", no_write_beside_the_data)
    cache = tmp_path / "cache"
    open_indexed_dataset(str(prefix), VOCAB, str(cache))
    [written] = cache.iterdir()
    assert written.name.endswith(f"-data{checks.STATS_SUFFIX}")
    assert json.loads(written.read_text())["max_token_id"] == 3


def test_validation_datasets_are_checked_at_start_up(data):
    from tst_megatron.data.builders import build_train_samples
    from tst_megatron.training.run_config import settings_from_flags

    paths = ["--train-data-path", data["good"], "--valid-data-path", data["merged"]]
    settings = settings_from_flags([*LAUNCH[:-4], "--vocab-size", str(VOCAB), *paths])
    sections = (settings.data, settings.schedule, settings.batch, settings.tst, settings.model)
    with pytest.raises(DataError, match=r"merged': document 150 holds token id"):
        build_train_samples(*sections, None)  # fails in the checks, before the tokenizer
