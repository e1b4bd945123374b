"""Distributed-optimizer checkpoint formats, fully parallel save/load and async saves.

Real 2-rank launches (DP=2 or TP=2, distributed optimizer, dropout off so that layouts can be
compared): a ``dp_reshardable`` checkpoint (the default; written with ``--async-save``)
resumes bit for bit at its layout and reshards across data parallel; a layout change of the
model-parallel sizes is refused for it with a message and selects the reshardable path for a
``--ckpt-fully-reshardable`` checkpoint. The digests recorded while writing match the files.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest

from tests.support.launches import (
    DP2,
    ERROR,
    MODEL,
    TRAIN,
    TST,
    Launch,
    assert_same_losses,
    iters,
    launch,
    listing,
)

pytestmark = pytest.mark.slow
NO_DROPOUT = ["--hidden-dropout", "0", "--attention-dropout", "0"]
BASE = [*MODEL, *TRAIN, *TST, *NO_DROPOUT]
TP2 = ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"]
RESHARD_ATOL = 2e-5  # another layout sums in another order (fp32)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("formats")


def run(tmp: Path, name: str, extra: list[str], nproc: int = 2) -> Launch:
    return launch(tmp, name, extra, nproc=nproc, via="direct", base=BASE)


@pytest.fixture(scope="module")
def reference(tmp) -> Launch:
    ref = run(tmp, "reference", DP2)
    assert ref.returncode == 0, ref.log[-3000:]
    return ref


@pytest.fixture(scope="module")
def dp_async(tmp) -> tuple[Launch, Path]:
    """DP=2, default format, async saves at 2 and 4, exit (sync save) at 5."""
    save = tmp / "dp"
    cut = run(
        tmp, "dp_async",
        [*DP2, "--save", str(save), "--save-interval", "2", "--async-save",
         "--use-persistent-ckpt-worker", "--exit-interval", "5"],
    )  # fmt: skip
    assert cut.returncode == 0, cut.log[-3000:]
    return cut, save


def test_async_saves_are_published_with_the_digests_of_what_was_written(dp_async, reference):
    cut, save = dp_async
    assert "scheduled async save of checkpoint" in cut.log
    assert cut.log.count("(async save published)") == 2
    assert listing(save) == ("5", iters(2, 4, 5))
    assert_same_losses(cut, reference, range(1, 6))
    for iteration in (2, 4, 5):
        path = save / f"iter_{iteration:07d}"
        meta = json.loads((path / "tst_checkpoint.json").read_text())
        assert meta["optimizer_format"] == "dp_reshardable"
        on_disk = {p.name for p in path.iterdir()} - {"tst_checkpoint.json"}
        assert set(meta["files"]) == on_disk and "__1_0.distcp" in on_disk
        for name, (size, crc) in meta["files"].items():
            data = (path / name).read_bytes()
            assert (len(data), zlib.crc32(data)) == (size, crc), name


def test_dp_reshardable_resumes_exactly_at_its_layout(dp_async, reference, tmp):
    _, save = dp_async
    resumed = run(tmp, "dp_resumed", [*DP2, "--load", str(save)])
    assert resumed.returncode == 0, resumed.log[-3000:]
    assert (
        "loaded checkpoint {} at iteration 5 (phase 2, layout unchanged, optimizer state "
        "dp_reshardable)".format(save / "iter_0000005") in resumed.log
    )
    assert_same_losses(resumed, reference, range(6, 9))


def test_dp_reshardable_reshards_across_data_parallel(dp_async, reference, tmp):
    _, save = dp_async
    one = run(tmp, "dp_to_one", [*DP2, "--load", str(save / "iter_0000004")], nproc=1)
    assert one.returncode == 0, one.log[-3000:]
    assert "layout changed: resharded, optimizer state dp_reshardable" in one.log
    assert sorted(one.losses) == [5, 6, 7, 8]
    for it in range(5, 9):
        assert one.losses[it] == pytest.approx(reference.losses[it], abs=RESHARD_ATOL), it


@pytest.fixture(scope="module")
def tp2_checkpoints(tmp) -> dict[str, tuple[Launch, Path]]:
    """TP=2 runs cut at 3, one per format."""
    out = {}
    for name, flags in (("dp", []), ("fully", ["--ckpt-fully-reshardable"])):
        save = tmp / f"tp2_{name}"
        cut = run(tmp, f"tp2_{name}", [*TP2, *flags, "--save", str(save), "--exit-interval", "3"])
        assert cut.returncode == 0, cut.log[-3000:]
        out[name] = (cut, save)
    return out


def test_layout_change_selects_the_fully_reshardable_path(tp2_checkpoints, reference, tmp):
    cut, save = tp2_checkpoints["fully"]
    resumed = run(tmp, "tp2_fully_to_dp2", [*DP2, "--load", str(save)])
    assert resumed.returncode == 0, resumed.log[-3000:]
    assert "layout changed: resharded, optimizer state fully_reshardable" in resumed.log
    losses = {**cut.losses, **resumed.losses}
    assert sorted(losses) == list(range(1, 9))
    for it in range(1, 9):
        assert losses[it] == pytest.approx(reference.losses[it], abs=RESHARD_ATOL), it


def test_layout_change_of_a_dp_reshardable_checkpoint_is_refused(tp2_checkpoints, tmp):
    _, save = tp2_checkpoints["dp"]
    refused = run(tmp, "tp2_dp_to_dp2", [*DP2, "--load", str(save)])
    assert refused.returncode == 1 and not refused.losses
    assert (
        f"{ERROR}checkpoint {save / 'iter_0000003'} holds its distributed-optimizer state in "
        "the dp_reshardable format, which reshards across data parallel only, and this run's "
        "layout differs: tensor_model_parallel_size: checkpoint 2, this run 1" in refused.log
    )
    assert "--ckpt-fully-reshardable" in refused.log and "--no-load-optim" in refused.log
    assert refused.log.count("Traceback") == 0
