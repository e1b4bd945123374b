"""Every fault of issue 26 that ended in a raw traceback is one line naming the cause.

Each case is provoked from outside the process: ``pretrain_tst.py`` and the tools run as
subprocesses (bad flags, a damaged checkpoint record, an empty dataset, a rank killed by
another process, a garbled ``.gz``, a full disk, Ctrl-C), and the test checks the one line,
the exit status and that no Python traceback was printed.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from tests.support.launches import ERROR, MOCK, MODEL, TRAIN, TST, Running, launch
from tst_megatron.testing.datasets import write_documents

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "sample" / "tokenizer.json"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def pretrain(*flags: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """pretrain_tst.py with the tiny model, schedule and (unless ``flags`` set the phase-1
    length) the TST flags of `tests.support.launches`."""
    tst = [] if "--tst-phase1-iters" in flags else TST
    command = [sys.executable, str(ROOT / "pretrain_tst.py"), *MODEL, *TRAIN, *tst, *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=ENV)  # fmt: skip


def one_error(done: subprocess.CompletedProcess, prefix: str = ERROR) -> str:
    """The one error line of a finished process (asserting there is exactly one)."""
    text = done.stdout + done.stderr
    assert "Traceback" not in text and "Exception ignored" not in text, text[-4000:]
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, text[-4000:]
    return lines[0].removeprefix(prefix)


# --------------------------------------------------------------------------------------------
# Flags: checked before any expensive work (exit 2)
# --------------------------------------------------------------------------------------------

BAD_FLAGS = [
    (["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
    (["--hidden-dropout", "1.5"], "--hidden-dropout must be in [0, 1), got 1.5"),
    (["--adam-beta1", "1.5"], "--adam-beta1 must be in [0, 1), got 1.5"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1.0"),
    (["--init-method-std", "-0.02"], "--init-method-std must be a finite number > 0, got -0.02"),
    (["--clip-grad", "nan"], "--clip-grad must be a finite number >= 0, got nan"),
    (["--tst-bag-size", "100000"], "--tst-bag-size 100000 exceeds --seq-length 32"),
    (["--tst-phase1-fraction", "1"],
     "--tst-phase1-fraction must be in the open interval (0, 1), got 1.0"),
    (["--tst-bag-size", "4", "--tst-phase1-iters", "8"],
     "--tst-phase1-iters 8 equals --train-iters 8: no phase 2 (plain next-token training) "
     "would follow, and phase 1 alone ends 1.5-3.5 nats worse"),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "expected"), BAD_FLAGS, ids=lambda v: " ".join(v)[:40])
def test_a_numeric_flag_torch_or_megatron_would_reject_is_one_line(tmp_path, flags, expected):
    done = pretrain(*flags, *MOCK, cwd=tmp_path)
    assert done.returncode == 2
    assert one_error(done).startswith(expected)


@pytest.mark.parametrize(("flags", "expected"), [
    (["--attention-dropout", "-0.1"], "--attention-dropout must be in [0, 1), got -0.1"),
    (["--adam-beta2", "1"], "--adam-beta2 must be in [0, 1), got 1.0"),
    (["--adam-eps", "0"], "--adam-eps must be a finite number > 0, got 0.0"),
    (["--norm-epsilon", "inf"], "--norm-epsilon must be a finite number > 0, got inf"),
    (["--min-lr=-1e-5"], "--min-lr must be a finite number >= 0, got -1e-05"),
    (["--rotary-percent", "0"], "--rotary-percent must be in (0, 1], got 0.0"),
    (["--hysteresis", "0"], "--hysteresis must be a finite number >= 1, got 0"),
    (["--moe-aux-loss-coeff", "nan"], "--moe-aux-loss-coeff must be a finite number >= 0"),
])  # fmt: skip
def test_every_ranged_flag_is_checked_by_validate_args(flags, expected):
    """The same check in process, for the flags not launched above."""
    from tst_megatron.training.arguments import ConfigError, parse_args, validate_args

    args = parse_args([*MODEL, *TRAIN, *TST, *MOCK, *flags])
    with pytest.raises(ConfigError) as raised:
        validate_args(args, 1)
    assert str(raised.value).startswith(expected)


def test_metrics_jsonl_under_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    done = pretrain(*MOCK, "--metrics-jsonl", str(tmp_path / "file" / "m.jsonl"), cwd=tmp_path)
    assert done.returncode == 2
    assert one_error(done) == (
        f"--metrics-jsonl {tmp_path / 'file' / 'm.jsonl'}: {tmp_path / 'file'} is a file, "
        "not a directory"
    )


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None,
                    reason="tensorboard is installed here")  # fmt: skip
def test_tensorboard_dir_without_tensorboard_is_one_line(tmp_path):
    done = pretrain(*MOCK, "--tensorboard-dir", str(tmp_path / "tb"), cwd=tmp_path)
    assert done.returncode == 2
    assert one_error(done) == (
        f"--tensorboard-dir {tmp_path / 'tb'} needs the tensorboard package, which is not "
        "installed: pip install tensorboard, or drop the flag"
    )


# --------------------------------------------------------------------------------------------
# A damaged record, an empty dataset, a dead peer (exit 1)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("change", "expected"), [
    ({"tst": {"bag_size": 4, "mode": "full"}}, "tst.phase is missing, not 1 or 2"),
    ({"iteration": "abc"}, "iteration is 'abc', not a count of iterations"),
])  # fmt: skip
def test_a_damaged_checkpoint_record_is_one_line(tmp_path, change, expected):
    record = {"iteration": 4, "tst": {"phase": 2, "bag_size": 4, "mode": "full"},
              "model": {}, "layout": {}, "files": {}}  # fmt: skip
    record.update(change)
    path = tmp_path / "iter_0000004"
    path.mkdir()
    (path / "tst_checkpoint.json").write_text(json.dumps(record))
    done = pretrain(*MOCK, "--load", str(path), cwd=tmp_path)
    assert done.returncode == 1
    line = one_error(done)
    assert line.startswith(f"{path / 'tst_checkpoint.json'} is damaged: {expected}"), line


@pytest.mark.slow
def test_an_empty_dataset_is_one_line_without_a_stray_traceback(tmp_path):
    prefix = write_documents(tmp_path / "empty", [])
    done = pretrain("--data-path", prefix, "--tokenizer-type", "NullTokenizer",
                    "--vocab-size", "512", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 1
    assert one_error(done) == (
        f"dataset {prefix!r}: {prefix}.bin is empty (0 bytes): the dataset holds no tokens; "
        "preprocess a corpus with text in it, or drop it from the blend"
    )


@pytest.mark.slow
def test_a_peer_killed_mid_run_is_one_line_on_the_survivor(tmp_path):
    """kill -9 of rank 1 (from outside): gloo's "Connection closed by peer" on rank 0."""

    def during(running: Running) -> None:
        running.wait_for(lambda: len(running.workers()) == 2)
        running.wait_for_checkpoint(1)
        rank1 = next(p for p in running.workers() if p.environ().get("RANK") == "1")
        rank1.kill()

    save = tmp_path / "save"
    run = launch(tmp_path, "peer", ["--use-distributed-optimizer", "--save", str(save),
                                    "--save-interval", "1"],
                 nproc=2, via="direct", fault="slow_steps:0.5", during=during)  # fmt: skip
    assert run.rank_returncodes[1] == -signal.SIGKILL and run.rank_returncodes[0] == 1
    assert "Traceback" not in run.log, run.log[-4000:]
    errors = [line for line in run.log.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1, run.log[-4000:]
    assert errors[0].startswith(f"{ERROR}a collective lost its connection: a peer rank died "
                                "after iteration ")  # fmt: skip
    assert "another rank is hung or dead; see its log for the cause" in errors[0]


# --------------------------------------------------------------------------------------------
# tools/preprocess_data.py
# --------------------------------------------------------------------------------------------


def preprocess(*args: str, cwd: Path) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "preprocess_data.py"),
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(TOKENIZER),
            *args]  # fmt: skip


def write_corpus(path: Path, lines: int) -> None:
    text = "".join(json.dumps({"text": f"document {i} " + "word " * 50}) + "\n"
                   for i in range(lines))  # fmt: skip
    path.write_text(text)


def garbled_gzip(source: bytes) -> bytes:
    """``source`` gzipped with a stretch of its deflate data overwritten so that zlib itself
    fails (not only the CRC check)."""
    data = bytearray(gzip.compress(source))
    for start in range(20, len(data) - 40, 7):
        bad = bytearray(data)
        bad[start:start + 8] = b"\xff" * 8
        try:
            gzip.decompress(bytes(bad))
        except zlib.error:
            return bytes(bad)
        except (OSError, EOFError):
            continue
    raise AssertionError("no corruption that zlib rejects")


def test_preprocess_of_a_garbled_gz_is_one_line(tmp_path):
    write_corpus(tmp_path / "c.jsonl", 200)
    (tmp_path / "bad.jsonl.gz").write_bytes(garbled_gzip((tmp_path / "c.jsonl").read_bytes()))
    (tmp_path / "out").mkdir()
    done = subprocess.run(
        preprocess("--input", str(tmp_path / "bad.jsonl.gz"), "--output-prefix",
                   str(tmp_path / "out" / "x"), cwd=tmp_path),
        capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip
    assert done.returncode == 1
    line = one_error(done, "error: ")
    assert line.startswith(f"cannot read {tmp_path / 'bad.jsonl.gz'}: ")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("partitions", ["1", "2"])
def test_preprocess_onto_a_full_disk_is_one_line_and_removes_its_outputs(tmp_path, partitions):
    write_corpus(tmp_path / "c.jsonl", 3000)
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                             capture_output=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        done = subprocess.run(
            preprocess("--input", str(tmp_path / "c.jsonl"), "--output-prefix",
                       str(disk / "x"), "--workers", "2", "--partitions", partitions,
                       cwd=tmp_path),
            capture_output=True, text=True, timeout=180, env=ENV,
        )  # fmt: skip
        assert done.returncode == 1
        line = one_error(done, "error: ")
        assert line.startswith(f"cannot write the outputs under {disk / 'x'}: No space left")
        assert line.endswith("[ENOSPC]; the partial outputs were removed")
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_preprocess_interrupted_by_ctrl_c_is_one_line_and_removes_its_outputs(tmp_path):
    write_corpus(tmp_path / "c.jsonl", 40000)
    (tmp_path / "out").mkdir()
    proc = subprocess.Popen(
        preprocess("--input", str(tmp_path / "c.jsonl"), "--output-prefix",
                   str(tmp_path / "out" / "x"), "--workers", "2", "--log-interval", "1000",
                   cwd=tmp_path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not any(".tmp-" in p.name for p in (tmp_path / "out").iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(1.0)  # mid-run: the workers are encoding
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert one_error(done, "interrupted ") == "(SIGINT): the partial outputs were removed"
    assert "KeyboardInterrupt" not in stderr
    assert list((tmp_path / "out").iterdir()) == []
