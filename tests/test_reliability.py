"""Reliability of pretrain_tst.py: each fault is provoked on CPU and its handling checked.

Faults come from real launches of pretrain_tst.py (tiny model, ``--mock-data`` unless the
data is the point) with `tst_megatron.training.fault_injection` (``TST_FAULT_INJECT``),
signals, damaged checkpoints and bad data files. Every test asserts the message and that
nothing was lost: runs that resume must reproduce the uninterrupted run's losses exactly.
Multi-rank runs use ``torchrun``; single-rank runs start the script directly with the
environment torchrun would give it (torchrun itself costs ~4 s of CPU per launch).
Launches are shared between assertions through module-scoped fixtures.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

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
from tst_megatron.data.builders import build_train_samples, open_indexed_dataset
from tst_megatron.data.checks import DataError
from tst_megatron.data.tokenizer import TokenizerError
from tst_megatron.settings import ReliabilityConfig
from tst_megatron.testing.datasets import write_documents as write_dataset
from tst_megatron.training import exit_signals, fault_injection
from tst_megatron.training.arguments import parse_args, validate_args
from tst_megatron.training.faults import ExitRequests
from tst_megatron.training.run_config import settings_from_flags

ROOT = Path(__file__).resolve().parents[1]


def checkpoint_tensors(path: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint, read offline."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path, tmp / "ckpt.pt")
    state = torch.load(tmp / "ckpt.pt", weights_only=False)
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


# --------------------------------------------------------------------------------------------
# Shared launches
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def reference(tmp) -> Launch:
    """The uninterrupted 2-rank run, saving every 2 iterations (``--load`` of an empty dir)."""
    save = str(tmp / "full")
    return launch(
        tmp, "full",
        [*DP2, "--save", save, "--save-interval", "2", "--load", save, "--allow-fresh-start"],
        nproc=2,
    )


@pytest.fixture(scope="module")
def chain(tmp) -> dict:
    """Killed during the save of 6, resumed and preempted at 7 (SIGTERM to rank 0 only),
    resumed to the end; all in one save directory with ``--ckpt-keep-last 2``.

    Holds each launch with ``listing`` of the directory right after it, and ``staged``: the
    files in ``iter_0000006.tmp`` after the kill.
    """
    save = tmp / "chain"
    flags = [*DP2, "--save", str(save), "--save-interval", "2", "--ckpt-keep-last", "2"]
    out = {}
    killed = launch(tmp, "killed", flags, nproc=2, fault="kill_during_save:6")
    out["killed"] = (killed, listing(save))
    staging = save / "iter_0000006.tmp"
    out["staged"] = {p.name for p in staging.iterdir()} if staging.is_dir() else set()
    flags += ["--load", str(save)]
    preempted = launch(
        tmp, "preempted", [*flags, "--exit-signal-handler"], nproc=2, fault="signal:0:7:SIGTERM"
    )
    out["preempted"] = (preempted, listing(save))
    out["resumed"] = (launch(tmp, "resumed", flags, nproc=2), listing(save))
    return out


# --------------------------------------------------------------------------------------------
# Crash-safe checkpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reference_run_starts_fresh_and_logs_the_boundary_spike(reference, tmp):
    assert reference.returncode == 0, reference.log[-3000:]
    assert f"no checkpoint under --load {tmp / 'full'}; starting fresh" in reference.log
    assert sorted(reference.losses) == list(range(1, 9))
    loss = reference.losses
    assert (
        f"phase 2, iteration 5: lm loss {loss[5]:.4f} (last phase-1 loss {loss[4]:.4f})"
        in reference.log
    )
    assert listing(tmp / "full") == ("8", iters(2, 4, 6, 8))  # no --ckpt-keep-last: all kept


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(chain, reference):
    killed, (tracker, names) = chain["killed"]
    assert killed.returncode != 0
    assert "[fault injection] rank 0 killed while saving iteration 6" in killed.log
    # iteration 6's shards were all staged but never published; 4 is still the latest
    assert tracker == "4" and names == {*iters(2, 4), "iter_0000006.tmp"}
    assert {"__0_0.distcp", ".metadata"} <= chain["staged"]
    assert "tst_checkpoint.json" not in chain["staged"]
    assert_same_losses(killed, reference, range(1, 7))


@pytest.mark.slow
def test_preemption_signal_saves_on_all_ranks_and_exits_zero(chain, reference):
    preempted, (tracker, names) = chain["preempted"]
    assert preempted.returncode == 0, preempted.log[-3000:]
    assert "iter_0000004 at iteration 4 (phase 1, layout unchanged, optimizer state" in (
        preempted.log
    )
    assert "note: took over the --save lock of host" in preempted.log  # the SIGKILLed run's
    assert "[fault injection] rank 0 sends itself SIGTERM" in preempted.log
    assert "exiting at iteration 7: received SIGTERM" in preempted.log
    # the stale iter_0000006.tmp was replaced by a published 6; keep-last 2 dropped 2 and 4
    assert tracker == "7" and names == iters(6, 7)
    assert_same_losses(preempted, reference, range(5, 8))


@pytest.mark.slow
def test_resume_after_kill_and_preemption_reproduces_the_uninterrupted_run(chain, reference):
    resumed, (tracker, names) = chain["resumed"]
    assert resumed.returncode == 0, resumed.log[-3000:]
    assert_same_losses(resumed, reference, range(8, 9))
    assert tracker == "8" and names == iters(7, 8)  # --ckpt-keep-last 2


@pytest.mark.slow
def test_load_without_checkpoint_fails_unless_fresh_start_allowed(tmp):
    (tmp / "empty").mkdir()
    run = launch(tmp, "no_ckpt", ["--load", str(tmp / "empty")])
    assert run.returncode == 1 and not run.records
    assert f"{ERROR}--load {tmp / 'empty'}: no checkpoint found" in run.log
    assert "--allow-fresh-start" in run.log


@pytest.mark.slow
def test_tracker_pointing_at_missing_checkpoint_fails(tmp):
    save = tmp / "partial"
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("12")
    run = launch(tmp, "partial", ["--load", str(save)])
    assert run.returncode == 1 and not run.records
    assert f"{ERROR}{save / 'latest_checkpointed_iteration.txt'} points at iteration 12" in run.log
    assert "the checkpoint was not published" in run.log


def damaged_copy(reference: Launch, tmp: Path, name: str, damage) -> Path:
    """A copy of the reference's latest checkpoint with ``damage(shard path)`` applied."""
    assert reference.returncode == 0
    save = tmp / name
    shutil.copytree(tmp / "full" / "iter_0000008", save / "iter_0000008")
    (save / "latest_checkpointed_iteration.txt").write_text("8")
    damage(save / "iter_0000008" / "__0_0.distcp")
    return save


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _garble(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\x5a" * 64)


@pytest.mark.slow
@pytest.mark.parametrize(("damage", "what"), [(_truncate, "truncated"), (_garble, "garbled")])
def test_corrupted_shard_fails_loudly(reference, tmp, damage, what):
    save = damaged_copy(reference, tmp, what, damage)
    run = launch(tmp, what, [*DP2, "--load", str(save)])
    assert run.returncode == 1 and not run.records, run.log[-3000:]
    assert f"{ERROR}checkpoint {save / 'iter_0000008'} is corrupted: __0_0.distcp" in run.log
    assert f"({what}" in run.log


@pytest.mark.slow
def test_resume_with_other_model_or_tst_settings_names_both_values(reference, tmp):
    assert reference.returncode == 0
    phase1 = tmp / "full" / "iter_0000002"
    run = launch(
        tmp, "mismatch",
        [*DP2, "--load", str(phase1), "--hidden-size", "128", "--tst-bag-size", "2",
         "--tst-mode", "input-only"],
    )
    assert run.returncode == 1 and not run.records
    assert f"{ERROR}checkpoint {phase1} does not match this run" in run.log
    for part in ("hidden_size: checkpoint 64, this run 128",
                 "--tst-bag-size: checkpoint 4, this run 2",
                 "--tst-mode: checkpoint 'full', this run 'input-only'"):
        assert part in run.log


# --------------------------------------------------------------------------------------------
# Numerical faults, hangs
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_run(tmp) -> Launch:
    """NaN loss at iteration 2 (skipped), then at 5 and 6 (two in a row: the limit)."""
    return launch(
        tmp, "nan", ["--save", str(tmp / "nan"), "--save-interval", "3", "--max-bad-steps", "2"],
        fault="nan_loss:2,5,6",
    )


def log_line(run: Launch, iteration: int) -> str:
    return re.search(rf"iteration +{iteration}/ +8 \|.*", run.log)[0]


@pytest.mark.slow
def test_single_nan_step_is_skipped_and_training_continues(nan_run):
    assert "number of skipped iterations:   1 | number of nan iterations:   1" in log_line(
        nan_run, 2
    )
    assert "grad norm: nan" in log_line(nan_run, 2)
    for it in (1, 3, 4):
        assert "number of nan iterations:   0" in log_line(nan_run, it)
        assert math.isfinite(nan_run.losses[it])


@pytest.mark.slow
def test_consecutive_nan_steps_stop_the_run_without_saving_them(nan_run, tmp):
    assert nan_run.returncode == 1
    assert (
        f"{ERROR}stopping: 2 consecutive iterations with a NaN/Inf loss or gradient, the last "
        "at iteration 6 (limit --max-bad-steps 2)" in nan_run.log
    )
    assert "iteration        7/" not in nan_run.log
    # the save due at 6 never happened: the last good checkpoint (3) is the published one
    assert listing(tmp / "nan") == ("3", iters(3))
    tensors = checkpoint_tensors(tmp / "nan" / "iter_0000003", tmp)
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.slow
def test_hung_rank_ends_the_job_within_the_collective_timeout(tmp):
    run = launch(
        tmp, "hang", ["--collective-timeout-s", "20"], nproc=2, fault="hang_rank:1:3",
        timeout=240,
    )
    assert run.returncode != 0 and run.seconds < 120  # start-up + 20 s, not the test's 240 s
    assert "[fault injection] rank 1 hangs at iteration 3" in run.log
    assert (
        f"{ERROR}a collective did not complete within --collective-timeout-s 20 after "
        "iteration 2: another rank is hung or dead" in run.log
    )
    assert sorted(run.losses) == [1, 2]


def test_exit_signal_and_duration_are_agreed_requests(tmp_path):
    """SIGUSR1 with ``--exit-signal SIGUSR1``; ``--exit-duration-in-mins`` (too slow to launch)."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        flags = {"exit_duration_in_mins": None, "exit_interval": None,
                 "exit_signal_handler": True, "exit_signal": "SIGUSR1"}
        requests = ExitRequests(ReliabilityConfig(**flags))
        assert requests.check(1, time.time()) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert requests.check(2, time.time()) == "received SIGUSR1"
        assert requests.signal_before_start() == "received SIGUSR1 during start-up"
        exit_signals.uninstall()
        assert signal.getsignal(signal.SIGUSR1) == previous
        flags |= {"exit_duration_in_mins": 1, "exit_signal_handler": False}
        requests = ExitRequests(ReliabilityConfig(**flags))
        assert requests.check(1, time.time() - 59) is None
        assert requests.check(2, time.time() - 61) == "--exit-duration-in-mins 1 reached"
    finally:
        exit_signals.uninstall()
        torch.distributed.destroy_process_group()


def test_fault_injection_is_inert_unless_set(monkeypatch):
    def step(data_iterator, model):
        return data_iterator, model

    monkeypatch.delenv(fault_injection.ENV, raising=False)
    fault_injection._faults.cache_clear()
    try:
        assert fault_injection._faults() == {}
        assert fault_injection.forward_step(step, 1) is step
        fault_injection.before_iteration(1)  # no process group needed: returns at once
        fault_injection.during_save(1, "unused")
        monkeypatch.setenv(fault_injection.ENV, "nan_loss:2,3;hang_rank:1:4")
        fault_injection._faults.cache_clear()
        assert fault_injection._faults() == {"nan_loss": [(2, 3)], "hang_rank": [(1, 4)]}
        assert fault_injection.forward_step(step, 1) is step
        assert fault_injection.forward_step(step, 3) is not step
        monkeypatch.setenv(fault_injection.ENV, "nan_loss")
        fault_injection._faults.cache_clear()
        with pytest.raises(ValueError, match="cannot parse fault 'nan_loss'"):
            fault_injection._faults()
    finally:
        fault_injection._faults.cache_clear()


# --------------------------------------------------------------------------------------------
# Data edge cases
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datasets(tmp) -> dict[str, str]:
    """Small ``.bin``/``.idx`` datasets with NullTokenizer ids (vocabulary 512)."""
    rng = np.random.RandomState(0)
    return {
        # 300 documents of 1-3 tokens: every document is shorter than one bag (s = 4)
        "tiny_docs": write_dataset(
            tmp / "tiny_docs", [list(rng.randint(0, 511, rng.randint(1, 4))) for _ in range(300)]
        ),
        "small": write_dataset(tmp / "small", [list(rng.randint(0, 511, 60)) for _ in range(4)]),
        "too_short": write_dataset(tmp / "too_short", [list(range(40)), list(range(40))]),
        "out_of_vocab": write_dataset(tmp / "out_of_vocab", [[1, 2, 3], [4, 600, 5]]),
    }


def null_tokenizer_data(*paths: str) -> list[str]:
    return ["--tokenizer-type", "NullTokenizer", "--vocab-size", "512", "--split", "100,0,0",
            "--data-path", *paths]


@pytest.fixture(scope="module")
def blend_run(tmp, datasets) -> Launch:
    """2 ranks on a blend of tiny datasets whose weights sum to 0.4 (both wrap around)."""
    data = null_tokenizer_data("0.2", datasets["tiny_docs"], "0.2", datasets["small"])
    return launch(tmp, "blend", [], nproc=2, data=data)


@pytest.mark.slow
def test_documents_shorter_than_a_bag_train(blend_run):
    assert blend_run.returncode == 0, blend_run.log[-3000:]
    assert sorted(blend_run.losses) == list(range(1, 9))
    assert all(math.isfinite(loss) for loss in blend_run.losses.values())
    tokens = {r["iteration"]: r["data_tokens"] for r in blend_run.records}
    assert tokens[8] == 4 * 4 * (4 * 33 - 1) + 4 * 4 * 32  # windows cross documents


@pytest.mark.slow
def test_blend_weights_are_normalised_with_one_note(blend_run, datasets):
    note = (
        f"note: blend weights 0.2 ({datasets['tiny_docs']}), 0.2 ({datasets['small']}) sum to "
        "0.4; normalised to 0.5, 0.5"
    )
    assert blend_run.log.count(note) == 1  # printed by the logging rank only


@pytest.mark.slow
def test_data_budget_and_repeat_warning_reach_the_log_once(blend_run, datasets):
    for name, tokens in (("tiny_docs", None), ("small", 240)):
        prefix = datasets[name]
        lines = re.findall(
            rf"\] data budget: dataset {re.escape(prefix)}: ([\d,]+) training tokens; phase 1 "
            r"reads [\d,]+ \([\d.]+ epochs of its [\d,]+-token partition\); phase 2 reads",
            blend_run.log,
        )
        assert len(lines) == 1, blend_run.log[-3000:]  # once, with the logging rank's timestamp
        if tokens:
            assert int(lines[0].replace(",", "")) == tokens
    assert blend_run.log.count("TST's gain is an equal-FLOPs gain that assumes fresh data") == 1
    assert blend_run.log.index("data budget") < re.search(r"iteration +1/", blend_run.log).start()


@pytest.mark.slow
def test_dataset_shorter_than_one_phase1_window_is_rejected(tmp, datasets):
    run = launch(tmp, "too_short", [], data=null_tokenizer_data(datasets["too_short"]))
    assert run.returncode == 1 and not run.records
    assert (
        f"{ERROR}dataset {datasets['too_short']!r}: its training split holds 80 tokens, fewer "
        "than one phase-1 sample window of s*(L+1) = 4*(32+1) = 132 tokens (--tst-bag-size 4, "
        "--seq-length 32)" in run.log
    )


def test_truncated_bin_is_rejected(tmp, datasets):
    prefix = tmp / "truncated"
    for ext in (".bin", ".idx"):
        shutil.copy(datasets["small"] + ext, f"{prefix}{ext}")
    os.truncate(f"{prefix}.bin", 100)
    with pytest.raises(DataError, match=r"truncated'.*describes 960 bytes of tokens .*holds 100"):
        open_indexed_dataset(str(prefix))


def test_tokens_outside_the_vocabulary_are_rejected(datasets):
    data = null_tokenizer_data(datasets["out_of_vocab"])
    settings = settings_from_flags([*MODEL, *TRAIN, *TST, *data])
    sections = (settings.data, settings.schedule, settings.batch, settings.tst, settings.model)
    with pytest.raises(DataError, match="document 1 holds token id 600 but the model's vocab"):
        build_train_samples(*sections, None)  # fails in the checks, before the tokenizer


def test_tokenizer_larger_than_the_model_vocabulary_is_rejected():
    from tst_megatron.training.loop import Trainer

    settings = settings_from_flags([
        *MODEL, *TRAIN, *TST, "--mock-data", "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", str(ROOT / "data" / "sample"), "--vocab-size", "100",
    ])  # fmt: skip
    with pytest.raises(TokenizerError, match=r"has 8192 tokens but .*--vocab-size 100\) has 128"):
        Trainer(settings)


def validated(*data: str) -> Namespace:
    args = parse_args([*MODEL, *TRAIN, *TST, *data])
    validate_args(args, 1)
    return args
