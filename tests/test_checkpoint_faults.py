"""Checkpoint faults provoked from outside: a second job on one --save, damaged records, a
resume that would change the schedule, full and read-only disks, and the small ones.

Real launches of ``pretrain_tst.py`` (one rank, tiny model, ``--mock-data``) against a
real file system (a small tmpfs mounted by the test when it runs as root; skipped with the
reason otherwise). Each test asserts the one ``error:`` line, the exit code, and where a run
resumes, that it reproduces the uninterrupted run's losses bit for bit. Pure checks (stale
locks, schedule arithmetic, record parsing) run in-process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from tests.support.launches import (
    ERROR,
    MODEL,
    TRAIN,
    TST,
    Launch,
    Running,
    assert_same_losses,
    iters,
    launch,
    listing,
)
from tests.support.multirank import run_single
from tst_megatron.settings import CheckpointConfig, Environment
from tst_megatron.training import checkpointing as ckpt
from tst_megatron.training.arguments import ConfigError, parse_args
from tst_megatron.training.checkpoint_lock import LOCK_NAME, LockHolder, SaveDirLock
from tst_megatron.training.checkpoint_settings import CheckpointedRun
from tst_megatron.training.run_config import settings_from_flags

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt_faults")


@pytest.fixture(scope="module")
def reference(tmp) -> Launch:
    """The uninterrupted run, saving every 2 iterations; the save of 8 is tampered with after
    it was written and before publication (another writer mixing in)."""
    run = launch(
        tmp, "reference", ["--save", str(tmp / "ref"), "--save-interval", "2"],
        fault="tamper_during_save:8",
    )  # fmt: skip
    assert run.returncode == 0, run.log[-3000:]
    assert listing(tmp / "ref") == ("8", iters(2, 4, 6, 8))
    return run


def copy_checkpoint(tmp: Path, name: str, iteration: int) -> Path:
    """A save directory holding a copy of the reference's checkpoint ``iteration``."""
    save = tmp / name
    shutil.copytree(tmp / "ref" / f"iter_{iteration:07d}", save / f"iter_{iteration:07d}")
    (save / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return save


def one_error_line(run: Launch) -> str:
    lines = [line for line in run.log.splitlines() if line.startswith(ERROR)]
    assert len(lines) == 1 and "Traceback" not in run.log, run.log[-3000:]
    return lines[0]


# --------------------------------------------------------------------------------------------
# Defect 2: one writer per --save; digests of what was written
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_jobs(tmp, reference) -> dict[str, Launch]:
    """Job 1 saves into S. After its first checkpoint it is stopped (SIGSTOP) from outside;
    job 2 on S is refused; job 3 on S takes the lock over with --override-save-lock, resumes
    and finishes; job 1 continues (SIGCONT) and reaches its next save."""
    save = tmp / "shared"
    flags = ["--save", str(save), "--save-interval", "2"]
    out = {}

    def during(running: Running) -> None:
        running.wait_for_checkpoint(2)
        out["lock"] = json.loads((save / LOCK_NAME).read_text())
        job1 = psutil.Process(running.procs[0].pid)
        job1.suspend()
        try:
            out["refused"] = launch(tmp, "job2", [*flags, "--load", str(save)])
            out["override"] = launch(
                tmp, "job3", [*flags, "--load", str(save), "--override-save-lock"]
            )
        finally:
            job1.resume()

    out["job1"] = launch(tmp, "job1", flags, fault="slow_steps:0.5", during=during)
    out["listing"] = listing(save)
    out["lock_left"] = (save / LOCK_NAME).exists()
    return out


@pytest.mark.slow
def test_second_job_on_the_same_save_is_refused(two_jobs, tmp):
    refused, lock = two_jobs["refused"], two_jobs["lock"]
    assert refused.returncode == 1 and not refused.losses
    line = one_error_line(refused)
    assert f"--save {tmp / 'shared'} is in use by another job: host {lock['host']}, pid " in line
    assert f"pid {lock['pid']}," in line and "--override-save-lock" in line


@pytest.mark.slow
def test_override_takes_the_lock_and_the_old_job_stops_before_publishing(
    two_jobs, reference, tmp
):
    override, job1 = two_jobs["override"], two_jobs["job1"]
    assert override.returncode == 0, override.log[-3000:]
    assert "overrode the --save lock of host" in override.log
    assert_same_losses(override, reference, range(3, 9))  # resumed from job 1's iteration 2
    assert job1.returncode == 1
    assert f"the lock of --save {tmp / 'shared'} is now held by nobody" in one_error_line(job1)
    # job 3's checkpoints are untouched by job 1; the lock was released at the end
    assert two_jobs["listing"] == ("8", iters(2, 4, 6, 8)) and not two_jobs["lock_left"]
    ckpt.verify_files(str(tmp / "shared" / "iter_0000008"), ckpt.read_checkpoint_meta(
        str(tmp / "shared" / "iter_0000008"))["files"])  # fmt: skip


@pytest.mark.slow
def test_digests_are_those_of_what_was_written(reference, tmp):
    """The shard altered after writing, before publication, is detected at load: the CRC was
    taken while writing, not re-read when publishing."""
    assert "[fault injection] rank 0 overwrites part of" in reference.log
    run = launch(tmp, "tampered", ["--load", str(tmp / "ref")])
    assert run.returncode == 1 and not run.losses
    line = one_error_line(run)
    assert f"checkpoint {tmp / 'ref' / 'iter_0000008'} is corrupted: __0_0.distcp has CRC32" in line
    assert "(garbled)" in line


def _holder(**changes) -> LockHolder:
    return LockHolder(**{**LockHolder.this_process().__dict__, **changes})


def test_stale_locks_are_taken_over_and_live_ones_refused(tmp_path, monkeypatch):
    save = tmp_path / "save"
    save.mkdir()
    lock_file = save / LOCK_NAME

    def write(holder: LockHolder) -> None:
        lock_file.write_text(json.dumps(holder.__dict__))

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(dead.pid).create_time()
    dead.wait()
    write(_holder(pid=dead.pid, pid_started=started))  # this host, process gone
    lock, note = SaveDirLock.acquire(str(save))
    assert note.startswith("took over the --save lock of host") and "(no longer running)" in note
    assert lock.read_holder() == lock.holder
    lock.check_held()
    write(_holder(host="node-17", pid=4242))  # another host: cannot tell, treated as alive
    with pytest.raises(ckpt.CheckpointError, match=r"in use by another job: host node-17, pid "
                       r"4242.*--override-save-lock"):
        SaveDirLock.acquire(str(save))
    with pytest.raises(ckpt.CheckpointError, match="is now held by host node-17, pid 4242"):
        lock.check_held()
    lock, note = SaveDirLock.acquire(str(save), override=True)
    assert note.startswith("overrode the --save lock of host node-17")
    # the same Slurm job, requeued (restart count 1) on another node: its old instance is gone
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write(_holder(host="node-3", pid=99, slurm_job_id="777", slurm_restart_count=0))
    lock, note = SaveDirLock.acquire(str(save))
    assert "Slurm job 777" in note and lock.holder.slurm_restart_count == 1
    lock.release()
    assert not lock_file.exists()


# --------------------------------------------------------------------------------------------
# Defect 3: load errors
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_missing_files_entry_refuses_a_garbled_checkpoint(reference, tmp):
    save = copy_checkpoint(tmp, "no_files", 6)
    path = save / "iter_0000006"
    meta = json.loads((path / "tst_checkpoint.json").read_text())
    del meta["files"]
    (path / "tst_checkpoint.json").write_text(json.dumps(meta))
    with open(path / "__0_0.distcp", "r+b") as f:
        f.seek(2000)
        f.write(b"\x5a" * 256)
    run = launch(tmp, "no_files", ["--load", str(save)])
    assert run.returncode == 1 and not run.losses
    assert f"{path / 'tst_checkpoint.json'} lacks files: without the recorded file digests" in (
        one_error_line(run)
    )


@pytest.mark.slow
def test_checkpoint_exception_of_torch_dcp_is_one_error_line(reference, tmp):
    """A shard missing from disk and from the record passes verification; torch's
    ``CheckpointException`` (a BaseException) is then caught by the trainer and by the
    converters' loader (`conversion.megatron_io.load_model`)."""
    save = copy_checkpoint(tmp, "dcp_error", 6)
    path = save / "iter_0000006"
    meta = json.loads((path / "tst_checkpoint.json").read_text())
    shard = sorted(p.name for p in path.glob("*.distcp"))[-1]  # 0.16 writes 2 files, 0.19 1
    del meta["files"][shard]
    (path / "tst_checkpoint.json").write_text(json.dumps(meta))
    (path / shard).unlink()
    run = launch(tmp, "dcp_error", ["--load", str(save)])
    assert run.returncode == 1 and not run.losses
    assert f"cannot load checkpoint {path}: " in one_error_line(run)
    message = run_single(conversion_load_error, args=(str(path),), timeout_s=300)
    assert message.startswith(f"cannot load checkpoint {path}: "), message


def conversion_load_error(path: str) -> str:
    """`megatron_io.load_model` of ``path`` in one process: the ConversionError's message."""
    from tst_megatron.conversion import ConversionError
    from tst_megatron.conversion.megatron_io import load_model
    from tst_megatron.training.tool_flags import single_process_settings

    flags = [*MODEL, "--vocab-size", "512", "--tokenizer-type", "NullTokenizer"]
    run, _ = single_process_settings(parse_args(flags))
    try:
        load_model(run, path)
    except ConversionError as err:
        return str(err)
    return "loaded"


def test_truncated_record_is_named(tmp_path):
    path = tmp_path / "iter_0000004"
    path.mkdir()
    (path / "tst_checkpoint.json").write_text('{"iteration": 4, "tst": {"pha')
    with pytest.raises(ckpt.CheckpointError, match=rf"{path / 'tst_checkpoint.json'} is not valid "
                       r"JSON \(.*; truncated or overwritten\?\)"):
        ckpt.read_checkpoint_meta(str(path))
    (path / "tst_checkpoint.json").write_text(json.dumps({
        "iteration": 4, "tst": {}, "model": {}, "files": {".metadata": [1, 2]},
    }))  # fmt: skip
    with pytest.raises(ckpt.CheckpointError, match=r"tst_checkpoint.json lacks layout: it is no "
                       "checkpoint record"):
        ckpt.read_checkpoint_meta(str(path))
    meta = {"files": {".metadata": [1, 2]}}
    lacking = ", ".join(  # Megatron-Core 0.16 writes common.pt as well (mcore_compat)
        re.escape(f"files[{name!r}]") for name in ckpt.REQUIRED_FILES if name != ".metadata"
    )
    assert lacking.endswith(re.escape("files['metadata.json']"))
    with pytest.raises(ckpt.CheckpointError, match=rf"cannot load checkpoint {path}: .* lacks "
                       rf"{lacking}: without the recorded"):
        ckpt.recorded_files(meta, str(path))


# --------------------------------------------------------------------------------------------
# Defect 4: resumes that would change the schedule
# --------------------------------------------------------------------------------------------


def resumed(*extra: str) -> tuple[CheckpointedRun, CheckpointConfig]:
    """The checkpointed sections and the checkpoint section of a resume with ``extra``."""
    run = settings_from_flags([*MODEL, *TRAIN, *TST, "--mock-data", "--vocab-size", "512",
                               "--tokenizer-type", "NullTokenizer", "--load", "x", *extra],
                              env=Environment.cpu())  # fmt: skip
    return CheckpointedRun.of(run.with_padded_vocab_size(512)), run.checkpoint


def saved_meta(iteration: int, phase: int, bag: int = 4, fraction=0.5, train_iters=8) -> dict:
    p1 = int(fraction * train_iters) if bag > 1 else 0
    return {"iteration": iteration, "tst": {
        "phase": phase, "bag_size": bag, "mode": "full", "phase1_fraction": fraction,
        "phase1_iters": None, "phase1_iterations": p1, "train_iters": train_iters,
    }}  # fmt: skip


def test_schedule_changes_are_refused_or_need_a_flag():
    check = ckpt.check_schedule
    assert check(*resumed(), saved_meta(6, 2), "C") == []
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint C is at iteration 6, in phase 2, "
                       r"but this run's phase 1 ends at iteration 7 \(--tst-phase1-fraction "
                       r"0.875, --train-iters 8\).*go back to bag"):
        check(*resumed("--tst-phase1-fraction", "0.875"), saved_meta(6, 2), "C")
    smaller = ("--tst-phase1-fraction", "0.25")
    with pytest.raises(ckpt.CheckpointError, match=r"iteration 3, in phase 1, and this run's "
                       r"phase 1 ends at iteration 2 .*--tst-allow-schedule-change"):
        check(*resumed(*smaller), saved_meta(3, 1), "C")
    notes = check(*resumed(*smaller, "--tst-allow-schedule-change"), saved_meta(3, 1), "C")
    assert notes == ["TST schedule changed (--tst-allow-schedule-change): phase 1 ends now "
                     "instead of at iteration 4"]  # fmt: skip
    with pytest.raises(ckpt.CheckpointError, match=r"--train-iters 16 differs from checkpoint "
                       r"C's 8: .*--override-opt_param-scheduler"):
        check(*resumed("--train-iters", "16", "--tst-phase1-fraction", "0.25"),
              saved_meta(6, 2), "C")
    assert "--override-opt_param-scheduler" in check(
        *resumed("--train-iters", "16", "--tst-phase1-fraction", "0.25",
                    "--override-opt_param-scheduler"), saved_meta(6, 2), "C")[0]  # fmt: skip
    phase2 = ("--tst-phase", "2")
    with pytest.raises(ckpt.CheckpointError, match="saved by a baseline run"):
        check(*resumed(*phase2), saved_meta(8, 2, bag=1, fraction=None), "C")
    with pytest.raises(ckpt.CheckpointError, match=r"inside phase 1 \(which ends at iteration "
                       r"4\): finish phase 1 first"):
        check(*resumed(*phase2), saved_meta(2, 1), "C")
    assert check(*resumed(*phase2), saved_meta(4, 1), "C") == []  # phase 1 complete
    with pytest.raises(ckpt.CheckpointError, match="already in phase 2"):
        check(*resumed("--tst-phase", "1"), saved_meta(6, 2), "C")


def test_phase1_length_rounding_to_zero_is_refused():
    with pytest.raises(ConfigError, match=r"--tst-phase1-fraction 0.1 x --train-iters 8 = 0.8 "
                       r"rounds down to 0 phase-1 iterations: TST would be off"):
        resumed("--tst-phase1-fraction", "0.1")


@pytest.mark.slow
def test_resume_refused_when_phase1_would_return(reference, tmp):
    run = launch(tmp, "return_to_phase1",
                 ["--load", str(tmp / "ref" / "iter_0000006"), "--tst-phase1-fraction", "0.875"])
    assert run.returncode == 1 and not run.losses
    assert "resuming would go back to bag (phase-1) training" in one_error_line(run)


@pytest.mark.slow
def test_allowed_boundary_move_switches_at_resume_with_the_boundary_line(reference, tmp):
    run = launch(tmp, "moved_boundary",
                 ["--load", str(tmp / "ref" / "iter_0000002"), "--tst-phase1-fraction", "0.25",
                  "--tst-allow-schedule-change"])  # fmt: skip
    assert run.returncode == 0, run.log[-3000:]
    assert ("note: TST schedule changed (--tst-allow-schedule-change): phase 1 ends now "
            "instead of at iteration 4") in run.log  # fmt: skip
    assert "TST phase boundary at iteration 2: switching to standard" in run.log
    assert [r["phase"] for r in run.records if "lm_loss" in r] == [2] * 6


# --------------------------------------------------------------------------------------------
# Defect 6: full and read-only disks
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size_kb: int, *options: str):
    """A small real file system at ``path`` (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join([f"size={size_kb}k", *options])
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


@pytest.mark.slow
def test_read_only_save_fails_at_start_up_without_a_launcher(tmp):
    """Also: ``python pretrain_tst.py`` without torchrun runs as one rank and says so."""
    with tmpfs(tmp / "ro", 1024, "ro") as save:
        run = launch(tmp, "read_only", ["--save", str(save), "--save-interval", "2"], via="bare")
    assert run.returncode == 1 and not run.records
    assert "note: no launcher environment (RANK, WORLD_SIZE): running as a single rank" in run.log
    assert f"--save {save} is not writable: the file system is read-only" in one_error_line(run)


@pytest.mark.slow
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(reference, tmp):
    need = dir_bytes(tmp / "ref" / "iter_0000002")
    with tmpfs(tmp / "small", (need * 3 // 2) // 1024) as save:
        run = launch(tmp, "full_disk", ["--save", str(save), "--save-interval", "2"])
        assert run.returncode == 1
        line = one_error_line(run)
        assert f"cannot save the checkpoint of iteration 4 to {save / 'iter_0000004.tmp'}: " in line
        assert "no space left on the device" in line
        assert f"the previous checkpoint {save / 'iter_0000002'} and " in line
        assert listing(save) == ("2", iters(2))  # the partial iter_0000004.tmp was removed
        resumed = launch(tmp, "full_disk_resumed", ["--load", str(save)])
    assert resumed.returncode == 0, resumed.log[-3000:]
    assert_same_losses(resumed, reference, range(3, 9))


@pytest.mark.slow
def test_disk_turning_read_only_during_the_run_keeps_the_previous_checkpoint(reference, tmp):
    with tmpfs(tmp / "turns_ro", 16 * 1024) as save:

        def remount_read_only(running: Running) -> None:
            running.wait_for_checkpoint(2)
            subprocess.run(["mount", "-o", "remount,ro", str(save)], check=True)

        run = launch(tmp, "turns_ro", ["--save", str(save), "--save-interval", "2"],
                     fault="slow_steps:0.5", during=remount_read_only)  # fmt: skip
        assert run.returncode == 1
        line = one_error_line(run)
        assert "cannot save the checkpoint of iteration 4" in line
        assert "the file system is read-only" in line and "[EROFS]" in line
        assert f"the previous checkpoint {save / 'iter_0000002'} and " in line
        resumed = launch(tmp, "turns_ro_resumed", ["--load", str(save)])
    assert resumed.returncode == 0, resumed.log[-3000:]
    assert_same_losses(resumed, reference, range(3, 9))


def test_publication_fsyncs_before_the_rename_and_the_tracker(tmp_path, monkeypatch):
    """The order of durable steps rank 0 takes, recorded from os.fsync / os.replace."""
    from tst_megatron.training import checkpoint_files

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_files.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint_files.os, "replace", replace)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    staging = tmp_path / "iter_0000002.tmp"
    staging.mkdir()
    for name in ckpt.REQUIRED_FILES:
        (staging / name).write_bytes(b"x")
    pending = ckpt._PendingSave(
        save=str(tmp_path), keep_last=0, record={"iteration": 2}, iteration=2,
        staging=str(staging), final=str(tmp_path / "iter_0000002"), digests=None,
        sharding_type="dp_reshardable",
    )  # fmt: skip
    ckpt._publish_on_rank0(pending, {}, [])
    final = str(tmp_path / "iter_0000002")
    names = [(kind, os.path.basename(path)) for kind, path in events]
    synced_files = {name for kind, name in names[: names.index(("fsync", staging.name))]}
    assert set(ckpt.REQUIRED_FILES) | {ckpt.META + f".tmp-{os.getpid()}"} <= synced_files
    order = [names.index(step) for step in (
        ("fsync", staging.name), ("replace", "iter_0000002"), ("fsync", tmp_path.name),
        ("replace", ckpt.TRACKER),
    )]  # fmt: skip
    assert order == sorted(order) and names[-1] == ("fsync", tmp_path.name)
    assert Path(final, ckpt.META).exists()


# --------------------------------------------------------------------------------------------
# Defect 7: small ones
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_on_an_empty_directory_names_what_to_give(tmp):
    (tmp / "empty").mkdir()
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "evaluate.py"), *MODEL, "--mock-data",
         "--tokenizer-type", "NullTokenizer", "--vocab-size", "512", "--micro-batch-size", "2",
         "--eval-iters", "1", "--load", str(tmp / "empty")],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert run.returncode == 1
    assert f"evaluate.py: error: --load {tmp / 'empty'}: no checkpoint there" in run.stderr
    assert "--allow-fresh-start" not in run.stderr and "Traceback" not in run.stderr


def test_hf_to_mcore_with_a_truncated_safetensors_is_one_error(tmp_path, capsys):
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from tests.tool_import import import_tool

    hf = tmp_path / "hf"
    LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64).save_pretrained(hf)  # fmt: skip
    save_file({"model.embed_tokens.weight": torch.zeros(300, 64)}, hf / "model.safetensors")
    os.truncate(hf / "model.safetensors", 4000)
    code = import_tool("convert_checkpoint").main(
        ["hf-to-mcore", "--hf-dir", str(hf), "--save", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert f"error: cannot read {hf / 'model.safetensors'}: " in err
    assert "truncated or damaged safetensors file" in err


def test_yaml_type_errors_read_like_english(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("num_layers: two\nlr: fast\n")
    with pytest.raises(ConfigError, match=r"'num_layers' in .* must be an integer, got 'two'"):
        parse_args(["--yaml-config", str(config)])
    config.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match=r"'lr' in .* must be a number, got 'fast'"):
        parse_args(["--yaml-config", str(config)])



def test_verification_is_split_evenly_by_bytes():
    from tst_megatron.training.checkpoint_files import split_by_bytes

    files = {"big": [900, 0], "a": [300, 0], "b": [300, 0], "c": [300, 0], "tiny": [1, 0]}
    shares = split_by_bytes(files, 2)
    loads = sorted(sum(files[name][0] for name in share) for share in shares)
    assert loads == [900, 901] and sorted(n for share in shares for n in share) == sorted(files)
    assert split_by_bytes(files, 2) == shares  # the same on every rank
