"""``--async-save`` as Megatron-LM 0.16.1 has it: only with ``--use-persistent-ckpt-worker``.

Without the worker it is turned off with one line (Megatron-LM's rule); with it, each rank's
persistent worker writes the checkpoints while training goes on, and a resume from one of them
repeats the uninterrupted run bit for bit (one CPU rank). The first save reaches the worker
while it is still starting (seconds), so a worker that wrote the rank's live tensors instead of
a copy would record later steps' weights and fail the comparison.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest

from tests.support.launches import assert_same_losses, iters, launch, listing
from tst_megatron.training.arguments import ConfigError, parse_args, validate_args

NOTE = (
    "--async-save is not supported without --use-persistent-ckpt-worker (as in Megatron-LM): "
    "disabling --async-save, checkpoints are written synchronously"
)


def _validated(*flags: str):
    args = parse_args(["--mock-data", "--vocab-size", "512", "--num-layers", "2",
                       "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
                       "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "4",
                       *flags])  # fmt: skip
    validate_args(args, world_size=1)
    return args


def test_async_save_without_the_persistent_worker_is_turned_off_with_one_line(tmp_path):
    args = _validated("--save", str(tmp_path), "--async-save")
    assert args.async_save is False
    assert args.startup_notes.count(NOTE) == 1
    kept = _validated("--save", str(tmp_path), "--async-save", "--use-persistent-ckpt-worker")
    assert kept.async_save is True and NOTE not in kept.startup_notes
    with pytest.raises(ConfigError) as err:
        _validated("--save", str(tmp_path), "--use-persistent-ckpt-worker")
    assert str(err.value) == (
        "--use-persistent-ckpt-worker writes --async-save checkpoints: it needs --async-save"
    )


@pytest.mark.slow
def test_persistent_worker_saves_and_resumes_exactly(tmp_path: Path):
    reference = launch(tmp_path, "reference", [])
    assert reference.returncode == 0, reference.log[-3000:]
    save = tmp_path / "ckpt"
    worker = ["--async-save", "--use-persistent-ckpt-worker"]
    flags = ["--save", str(save), "--save-interval", "2", *worker, "--exit-interval", "5"]
    cut = launch(tmp_path, "cut", flags)
    assert cut.returncode == 0, cut.log[-3000:]
    assert NOTE not in cut.log
    assert cut.log.count("scheduled async save of checkpoint") == 2
    assert cut.log.count("(async save published)") == 2
    assert listing(save) == ("5", iters(2, 4, 5))
    assert_same_losses(cut, reference, range(1, 6))
    for iteration in (2, 4):  # written by the worker: the recorded digests are the files'
        path = save / f"iter_{iteration:07d}"
        files = json.loads((path / "tst_checkpoint.json").read_text())["files"]
        assert set(files) == {p.name for p in path.iterdir()} - {"tst_checkpoint.json"}
        for name, (size, crc) in files.items():
            data = (path / name).read_bytes()
            assert (len(data), zlib.crc32(data)) == (size, crc), name

    resumed = launch(tmp_path, "resumed", ["--load", str(save / "iter_0000004")])
    assert resumed.returncode == 0, resumed.log[-3000:]
    assert "loaded checkpoint {} at iteration 4".format(save / "iter_0000004") in resumed.log
    assert_same_losses(resumed, reference, range(5, 9))
