"""A published checkpoint is never modified (issue 26, item 1).

Real one-rank launches of pretrain_tst.py save every iteration into one directory while
rank 0 is SIGKILLed at each point of a publication (``TST_FAULT_INJECT=kill_during_save:
ITER:POINT``), a directory in the way cannot be moved aside, an old one cannot be deleted,
and a finished run is relaunched. After each, the newest published checkpoint loads, and the
chain of launches reproduces the uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.launches import (
    ERROR,
    Launch,
    assert_same_losses,
    iters,
    launch,
    listing,
)
from tst_megatron.training import checkpointing as ckpt
from tst_megatron.training import fault_injection


def chattr(flag: str, *paths: Path) -> bool:
    """``chattr +i`` / ``-i``: a file even root cannot delete, a directory it cannot rename."""
    if shutil.which("chattr") is None:
        return False
    done = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True)
    return done.returncode == 0


def digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("publish")


def flags(save: Path) -> list[str]:
    return ["--save", str(save), "--load", str(save), "--save-interval", "1",
            "--allow-fresh-start"]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp) -> Launch:
    run = launch(tmp, "reference", flags(tmp / "reference"))
    assert run.returncode == 0, run.log[-3000:]
    return run


@pytest.fixture(scope="module")
def chain(tmp) -> dict:
    """Each launch resumes from what the previous one left in one save directory."""
    save = tmp / "chain"
    out: dict = {"save": save}

    def step(name: str, fault: str | None = None, interval: str = "1") -> None:
        extra = [*flags(save)[:-2], interval, "--allow-fresh-start"]
        out[name] = (launch(tmp, name, extra, fault=fault), listing(save))

    step("staged", "kill_during_save:2:staged")  # shards written, nothing recorded
    step("recorded", "kill_during_save:3:recorded")  # record written in iter_3.tmp
    step("renamed", "kill_during_save:3:renamed")  # iter_3 in place, tracker still 2
    step("moved_aside", "kill_during_save:3:moved_aside")  # that iter_3 moved aside
    step("tracked", "kill_during_save:4:tracked")  # tracker 4, nothing cleaned yet
    blocker = save / "iter_0000005"  # a directory in the way that cannot be moved
    blocker.mkdir()
    if not chattr("+i", blocker):
        pytest.skip("chattr +i is not available here (needs root and ext4/xfs/tmpfs)")
    try:
        step("blocked")
    finally:
        chattr("-i", blocker)
    blocker.rmdir()
    stuck = save / "iter_0000006"  # a stale directory holding a file that cannot be deleted
    stuck.mkdir()
    (stuck / "stale").write_text("x")
    chattr("+i", stuck / "stale")
    try:
        step("half_failed")
        out["published_8"] = digests(save / "iter_0000008")
        step("relaunched", interval="3")  # 8 % 3: the end of the run saves (iteration 8)
        out["after_relaunch_8"] = digests(save / "iter_0000008")
    finally:
        chattr("-i", save / "iter_0000006.replaced" / "stale")
    return out


@pytest.mark.slow
def test_kill_at_every_point_of_a_publication_leaves_a_loadable_checkpoint(chain, reference):
    expected = {
        "staged": ("1", iters(1) | {"iter_0000002.tmp"}),
        "recorded": ("2", iters(1, 2) | {"iter_0000003.tmp"}),
        "renamed": ("2", iters(1, 2, 3)),
        "moved_aside": ("2", iters(1, 2) | {"iter_0000003.replaced", "iter_0000003.tmp"}),
        "tracked": ("4", iters(1, 2, 3, 4)),
    }
    for name, state in expected.items():
        run, after = chain[name]
        assert run.returncode == -9, (name, run.log[-3000:])
        assert "[fault injection] rank 0 killed while saving iteration" in run.log
        assert f"({name})" in run.log
        assert after == state, name
    assert ckpt.find_checkpoint(str(chain["save"])) == ckpt.iteration_dir(str(chain["save"]), 8)
    # each launch resumed from the newest published checkpoint and trained as the reference
    starts = {"recorded": 2, "renamed": 3, "moved_aside": 3, "tracked": 3, "half_failed": 5}
    for name, first in starts.items():
        run = chain[name][0]
        assert min(run.losses) == first, (name, run.log[-3000:])
        for it, loss in run.losses.items():
            assert loss == reference.losses[it], (name, it)


@pytest.mark.slow
def test_a_directory_that_cannot_be_moved_aside_fails_the_save_and_keeps_the_checkpoint(
    chain, reference
):
    run, after = chain["blocked"]
    assert run.returncode == 1, run.log[-3000:]
    errors = [line for line in run.log.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1 and "Traceback" not in run.log, run.log[-3000:]
    assert "cannot save the checkpoint of iteration 5" in errors[0]
    assert "permission denied" in errors[0] and "[EPERM]" in errors[0]
    assert "the previous checkpoint" in errors[0] and "iter_0000004 and " in errors[0]
    assert after == ("4", iters(1, 2, 3, 4, 5))  # the staging copy removed, nothing else
    assert run.losses == {5: reference.losses[5]}


@pytest.mark.slow
def test_a_stale_directory_that_cannot_be_deleted_is_a_note_and_the_run_resumes_exactly(
    chain, reference
):
    run, after = chain["half_failed"]
    assert run.returncode == 0, run.log[-3000:]
    assert_same_losses(run, reference, range(5, 9))
    assert "note: could not remove" in run.log and "iter_0000006.replaced" in run.log
    assert "the published checkpoint is complete: remove it by hand" in run.log
    assert after == ("8", iters(*range(1, 9)) | {"iter_0000006.replaced"})


@pytest.mark.slow
def test_relaunching_a_finished_run_does_not_rewrite_its_checkpoint(chain):
    run, after = chain["relaunched"]
    assert run.returncode == 0 and not run.losses, run.log[-3000:]
    assert "iter_0000008 of iteration 8 is published and intact: not saved again" in run.log
    assert chain["after_relaunch_8"] == chain["published_8"]
    assert after[0] == "8"


def test_publication_moves_an_unpublished_directory_aside_and_removes_it_after_the_tracker(
    tmp_path, monkeypatch
):
    """The order of rank 0's steps when ``iter_0000002`` exists but the tracker names 1."""
    events = []
    real_replace, real_remove = os.replace, ckpt._remove

    def replace(src, dst):
        events.append(("replace", os.path.basename(src), os.path.basename(dst)))
        real_replace(src, dst)

    def remove(path, notes):
        events.append(("remove", os.path.basename(path), os.path.lexists(path)))
        real_remove(path, notes)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    monkeypatch.setattr(ckpt, "_remove", remove)
    (tmp_path / ckpt.TRACKER).write_text("1")
    old = tmp_path / "iter_0000002"
    old.mkdir()
    (old / "partial").write_text("x")
    staging = tmp_path / "iter_0000002.tmp"
    staging.mkdir()
    for name in ckpt.REQUIRED_FILES:
        (staging / name).write_bytes(b"x")
    pending = ckpt._PendingSave(
        save=str(tmp_path), keep_last=0, record={"iteration": 2}, iteration=2,
        staging=str(staging), final=str(old), digests=None, sharding_type="fully_reshardable",
    )  # fmt: skip
    notes: list[str] = []
    ckpt._publish_on_rank0(pending, {}, notes)
    moves = [e for e in events if e[0] == "replace" and e[1].startswith("iter_")]
    assert moves[:2] == [
        ("replace", "iter_0000002", "iter_0000002.replaced"),
        ("replace", "iter_0000002.tmp", "iter_0000002"),
    ]
    tracker = next(i for i, e in enumerate(events) if e[2:] == (ckpt.TRACKER,))
    cleanup = events.index(("remove", "iter_0000002.replaced", True))
    assert tracker < cleanup and not notes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", ckpt.TRACKER]
    assert (tmp_path / ckpt.TRACKER).read_text() == "2"
    assert (old / ckpt.META).is_file() and not (old / "partial").exists()


def test_fault_injection_parses_every_publication_point(monkeypatch):
    for point in fault_injection.PUBLISH_POINTS:
        monkeypatch.setenv(fault_injection.ENV, f"kill_during_save:3:{point}")
        fault_injection._faults.cache_clear()
        assert fault_injection._faults() == {"kill_during_save": [(3, point)]}
    monkeypatch.setenv(fault_injection.ENV, "kill_during_save:3")
    fault_injection._faults.cache_clear()
    assert fault_injection._faults() == {"kill_during_save": [(3, "staged")]}
    monkeypatch.setenv(fault_injection.ENV, "kill_during_save:3:later")
    fault_injection._faults.cache_clear()
    with pytest.raises(ValueError, match="cannot parse fault 'kill_during_save:3:later'"):
        fault_injection._faults()
    monkeypatch.delenv(fault_injection.ENV)
    fault_injection._faults.cache_clear()

