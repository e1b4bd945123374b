"""The shipped Slurm scripts under a real local Slurm (Debian's slurm-wlm 22.05, one node).

`tests.support.slurm_cluster.LocalSlurm` starts munged, slurmctld and slurmd for this
host once for the module (state in a temporary directory; stopped by pid afterwards). The jobs
are ``examples/slurm/cpu_smoke.sbatch``: 2 tasks, gloo, a tiny model, 24 steps, through the
same ``common.sh`` as the GPU scripts. Faults come from outside, as Slurm sends them:
``scancel --signal=USR1 --batch`` (what ``#SBATCH --signal=B:USR1@...`` does before the time
limit) and a plain ``scancel`` (SIGTERM, then SIGKILL after KillWait). Every scenario is
compared with one uninterrupted job: the losses must be equal bit for bit.

Without root or without the packages (``scripts/setup_slurm.sh`` installs them) the Slurm tests
skip, saying why; ``TST_REQUIRE_SLURM=1`` (set by ``scripts/run_tests.sh``, i.e. ``make test``,
after it installed them) turns that into a failure. The ``common.sh`` checks at the end need
only bash and always run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.slurm_cluster import LocalSlurm, SlurmUnavailable, unavailable_reason

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "examples" / "slurm"
SMOKE = "examples/slurm/cpu_smoke.sbatch"
GPU_SCRIPTS = ("tst_3b_phase1.sbatch", "tst_3b_phase2.sbatch", "tst_10b_a1b.sbatch")
CKPT_NAME = "tst-cpu-smoke"  # cpu_smoke.sbatch's directory under CKPT_ROOT
TRAIN_ITERS, PHASE1_ITERS, SAVE_INTERVAL = 24, 12, 4  # as in cpu_smoke.sbatch
JOB_TIMEOUT = 300  # seconds for one job on a loaded 2-core machine


# --------------------------------------------------------------------------------------------
# Cluster and jobs
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """One local Slurm for the whole module (the only users of it), stopped by pid after it."""
    reason = unavailable_reason()
    cluster = None
    if reason is None:
        cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
        try:
            cluster.start()
        except SlurmUnavailable as err:
            reason = str(err)
    if reason:
        if os.environ.get("TST_REQUIRE_SLURM"):
            pytest.fail(f"TST_REQUIRE_SLURM is set but no local Slurm: {reason}")
        pytest.skip(reason)
    yield cluster
    cluster.stop()


@dataclass
class Run:
    """What a job (all its runs, requeued or not) left: final state, log, metrics."""

    info: object
    log: str
    records: list[dict]

    @property
    def losses(self) -> list[tuple[int, float]]:
        """(iteration, lm loss) of every logged step, in the order the runs logged them."""
        return [(r["iteration"], r["lm_loss"]) for r in self.records if "lm_loss" in r]


def job_env(ckpt_root: Path, **extra: str) -> dict[str, str]:
    """The submission environment (sbatch exports it to the job)."""
    env = {
        "CKPT_ROOT": str(ckpt_root),
        "TST_PYTHON": sys.executable,
        "PYTHONWARNINGS": "ignore",
        **extra,
    }
    return env


def clean_environment() -> None:
    """The jobs inherit the test's environment: no fault injection, no torchrun variables."""
    for name in ("TST_FAULT_INJECT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "OMP_NUM_THREADS"):  # fmt: skip
        os.environ.pop(name, None)


def metrics(ckpt_root: Path) -> list[dict]:
    path = ckpt_root / CKPT_NAME / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def last_iteration(ckpt_root: Path) -> int:
    records = metrics(ckpt_root)
    return max((r["iteration"] for r in records if "lm_loss" in r), default=0)


def wait_for(condition, what: str, timeout: float = JOB_TIMEOUT, poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}")
        time.sleep(poll)


def collect(slurm: LocalSlurm, job_id: int, log: Path, ckpt_root: Path) -> Run:
    info = slurm.wait_finished(job_id, JOB_TIMEOUT)
    return Run(info, log.read_text() if log.exists() else "", metrics(ckpt_root))


def assert_reference_losses(run: Run, reference: Run, iterations: range) -> None:
    """Every step ``run`` logged (repeated ones too) equals the uninterrupted job's, bit for
    bit, and together they cover ``iterations``."""
    expected = dict(reference.losses)
    assert {it for it, _ in run.losses} == set(iterations), run.log[-4000:]
    for it, loss in run.losses:
        assert loss == expected[it], (it, loss, expected[it])


def published(save: Path) -> tuple[str | None, set[str]]:
    """(the tracker's iteration, the directories in ``save``)."""
    tracker = save / "latest_checkpointed_iteration.txt"
    names = {p.name for p in save.iterdir() if p.is_dir()} if save.is_dir() else set()
    return (tracker.read_text().strip() if tracker.exists() else None), names


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    clean_environment()
    return tmp_path_factory.mktemp("slurm-jobs")


@pytest.fixture(scope="module")
def reference(slurm, tmp) -> Run:
    """The uninterrupted job: both phases in one run (``--tst-phase auto``)."""
    ckpt_root = tmp / "reference"
    log = tmp / "reference.out"
    job = slurm.sbatch(f"--output={log}", SMOKE, env=job_env(ckpt_root), cwd=ROOT)
    run = collect(slurm, job, log, ckpt_root)
    assert run.info.state == "COMPLETED", run.log[-4000:]
    assert [it for it, _ in run.losses] == list(range(1, TRAIN_ITERS + 1)), run.log[-4000:]
    return run


@pytest.fixture(scope="module")
def two_phase(slurm, tmp) -> dict:
    """``submit_two_phase.sh`` with the CPU job; phase 1 gets ``scancel --signal=USR1
    --batch`` (the time-limit warning) after its first checkpoint (mcore's checkpoint-writer
    helper process is running by then), so it saves, requeues itself and finishes phase 1 in
    its second run; phase 2 waits for that (afterok) and finishes the run.

    Holds both jobs' `Run`, the iteration last logged when the signal was sent, and samples
    of (phase 1 state, phase 1 restarts, phase 2 state, phase 2 reason) taken until phase 1
    completed.
    """
    ckpt_root = tmp / "two_phase"
    # a step takes ~10 ms on an idle machine: slowed so the warning, which passes through
    # slurmd, the batch shell and srun, lands before phase 1 ends (losses are unchanged)
    env = job_env(ckpt_root, PHASE1=f"{SMOKE} 1", PHASE2=f"{SMOKE} 2",
                  TST_FAULT_INJECT="slow_steps:0.25")  # fmt: skip
    submitted = slurm.run(
        "examples/slurm/submit_two_phase.sh", f"--output={tmp}/%x-%j.out", env=env, cwd=ROOT
    ).stdout
    phase1 = int(re.search(r"phase 1: job (\d+)", submitted).group(1))
    phase2 = int(re.search(r"phase 2: job (\d+)", submitted).group(1))
    wait_for(lambda: last_iteration(ckpt_root) > SAVE_INTERVAL + 1, "phase 1's 6th step")
    signalled_after = last_iteration(ckpt_root)
    slurm.run("scancel", "--signal=USR1", "--batch", str(phase1))
    samples = []
    deadline = time.monotonic() + 2 * JOB_TIMEOUT
    while True:
        first, second = slurm.job(phase1), slurm.job(phase2)
        samples.append((first.state, first.restarts, second.state, second.reason))
        if first.finished:
            break
        assert time.monotonic() < deadline, f"phase 1 did not finish: {first.raw}"
        time.sleep(0.2)
    log1, log2 = (tmp / f"{CKPT_NAME}-{job}.out" for job in (phase1, phase2))
    run2 = collect(slurm, phase2, log2, ckpt_root)
    records = run2.records
    run1 = Run(slurm.job(phase1), log1.read_text(), [r for r in records if r.get("phase") == 1])
    run2.records = [r for r in records if r.get("phase") == 2]
    return {"phase1": run1, "phase2": run2, "signalled_after": signalled_after,
            "samples": samples, "save": ckpt_root / CKPT_NAME}  # fmt: skip


@pytest.fixture(scope="module")
def cancelled_then_startup_signal(slurm, tmp, reference) -> dict:
    """Two jobs on one checkpoint directory that starts with the reference's iteration 16:

    1. ``scancel JOB`` (SIGTERM to every process, SIGKILL after KillWait) while the job writes
       the checkpoint of iteration 20 (``iter_0000020.tmp`` exists);
    2. a second job gets the time-limit warning while its tasks are starting up (the step is
       running, the trainer is still importing), requeues itself, and its requeued run resumes
       from the checkpoint the cancelled job left and finishes.
    """
    ckpt_root = tmp / "cancelled"
    save = ckpt_root / CKPT_NAME
    save.mkdir(parents=True)
    source = tmp / "reference" / CKPT_NAME
    shutil.copytree(source / "iter_0000016", save / "iter_0000016")
    (save / "latest_checkpointed_iteration.txt").write_text("16")
    env = job_env(ckpt_root)

    log = tmp / "cancelled.out"
    job = slurm.sbatch(f"--output={log}", SMOKE, env=env, cwd=ROOT)
    staging = save / "iter_0000020.tmp"
    wait_for(staging.exists, "the save of iteration 20 to start")
    slurm.run("scancel", str(job))
    cancelled = collect(slurm, job, log, ckpt_root)
    after_cancel = published(save)

    log = tmp / "startup.out"
    job = slurm.sbatch(f"--output={log}", SMOKE, env=env, cwd=ROOT)
    steps = ("squeue", "-h", "-s", "-j", str(job), "-o", "%i")
    wait_for(
        lambda: f"{job}.0" in slurm.run(*steps, check=False).stdout.split(),
        "the job's training step to start",
    )
    slurm.run("scancel", "--signal=USR1", "--batch", str(job))
    requeued = collect(slurm, job, log, ckpt_root)
    requeued.records = requeued.records[len(cancelled.records) :]
    return {"cancelled": cancelled, "after_cancel": after_cancel, "startup": requeued}


# --------------------------------------------------------------------------------------------
# Two phases, time-limit warning, requeue
# --------------------------------------------------------------------------------------------


def test_two_phase_submission_continues_from_phase1_checkpoint(two_phase, reference):
    phase1, phase2 = two_phase["phase1"], two_phase["phase2"]
    assert phase1.info.state == "COMPLETED" and phase1.info.exit_code == "0:0", phase1.info.raw
    assert phase2.info.state == "COMPLETED" and phase2.info.exit_code == "0:0", phase2.log
    # afterok: phase 2 pended on its dependency as long as phase 1 had not completed,
    # including while phase 1 was requeued
    waiting = [sample for sample in two_phase["samples"] if sample[0] != "COMPLETED"]
    assert waiting and all(s[2:] == ("PENDING", "Dependency") for s in waiting), waiting
    assert any(s[0] == "PENDING" and s[1] == 1 for s in waiting), "phase 1 was never requeued"
    assert phase2.info.start_time >= phase1.info.end_time, (phase1.info.raw, phase2.info.raw)
    # phase 2 starts from phase 1's last checkpoint and data position
    assert "(restart 0)" in phase2.log and "restart 1" not in phase2.log, phase2.log
    assert re.search(
        rf"loaded checkpoint \S+/iter_{PHASE1_ITERS:07d} at iteration {PHASE1_ITERS} \(phase 1",
        phase2.log,
    ), phase2.log
    assert f"TST phase boundary at iteration {PHASE1_ITERS}" in phase2.log
    tokens = {r["iteration"]: r["data_tokens"] for r in reference.records if "lm_loss" in r}
    assert phase2.records[0]["iteration"] == PHASE1_ITERS + 1
    for record in phase1.records + phase2.records:
        assert record["data_tokens"] == tokens[record["iteration"]], record
    # the two jobs together reproduce the single run exactly
    assert_reference_losses(phase2, reference, range(PHASE1_ITERS + 1, TRAIN_ITERS + 1))
    assert_reference_losses(phase1, reference, range(1, PHASE1_ITERS + 1))


def test_time_limit_warning_saves_requeues_and_resumes_bit_exact(two_phase, reference):
    phase1 = two_phase["phase1"]
    log = phase1.log
    assert phase1.info.restarts == 1, phase1.info.raw
    assert "time-limit warning (SIGUSR1)" in log, log
    first_run, _, second_run = log.partition("(restart 1)")
    assert second_run, f"phase 1 was not requeued: {log[-4000:]}"
    assert "Traceback" not in first_run, first_run[-6000:]
    exit_line = re.search(r"exiting at iteration (\d+): received SIGUSR1", first_run)
    assert exit_line, f"the trainer did not save and exit on SIGUSR1: {first_run[-6000:]}"
    stop = int(exit_line.group(1))
    assert two_phase["signalled_after"] <= stop < PHASE1_ITERS, (two_phase["signalled_after"], log)
    # every rank took part in the save at that step (its barriers), and it was published ...
    assert re.search(rf"saved checkpoint \S+/iter_{stop:07d} at iteration {stop} ", first_run)
    assert "the trainer stopped cleanly after the time-limit warning" in first_run
    assert f"requeueing job {phase1.info.job_id}" in first_run
    # ... and the requeued run (SLURM_RESTART_COUNT=1) resumed from it: the load verified every
    # rank's shard against the recorded CRCs
    assert f"job {phase1.info.job_id} (restart 1)" in log
    assert re.search(rf"loaded checkpoint \S+/iter_{stop:07d} at iteration {stop} ", second_run)
    # no step lost or repeated, every loss as in the uninterrupted run
    assert [it for it, _ in phase1.losses] == list(range(1, PHASE1_ITERS + 1)), log
    assert_reference_losses(phase1, reference, range(1, PHASE1_ITERS + 1))


# --------------------------------------------------------------------------------------------
# Hard cancel mid-save, warning during start-up
# --------------------------------------------------------------------------------------------


def test_hard_cancel_mid_save_keeps_previous_checkpoint_and_says_so(
    cancelled_then_startup_signal, reference
):
    cancelled = cancelled_then_startup_signal["cancelled"]
    tracker, names = cancelled_then_startup_signal["after_cancel"]
    assert cancelled.info.state == "CANCELLED", cancelled.info.raw
    # the save of 20 was cut: unpublished, the tracker still names 16
    assert tracker == "16" and "iter_0000020" not in names, (tracker, names)
    assert "iter_0000016" in names
    assert "SIGTERM: the job is being cancelled or preempted" in cancelled.log, cancelled.log
    assert (
        f"job {cancelled.info.job_id} cancelled or preempted" in cancelled.log
        and "newest published checkpoint, iteration 16 in" in cancelled.log
    ), cancelled.log[-3000:]
    assert_reference_losses(cancelled, reference, range(17, 21))
    # loadable: the next job resumed from it (next test) and reproduced the reference


def test_time_limit_warning_during_startup_requeues_and_resumes(
    cancelled_then_startup_signal, reference
):
    run = cancelled_then_startup_signal["startup"]
    log = run.log
    assert run.info.state == "COMPLETED" and run.info.restarts == 1, run.info.raw
    first_run, _, second_run = log.partition("(restart 1)")
    assert "time-limit warning (SIGUSR1)" in first_run, log
    assert f"requeueing job {run.info.job_id}" in first_run, log
    # forwarded once the trainer's handler was installed: recorded, a clean stop (before the
    # first step, or at the next step with a save), never a death from the signal
    assert "the trainer stopped cleanly after the time-limit warning" in first_run, first_run
    assert re.search(r"exiting at iteration \d+.*: received SIGUSR1", first_run), first_run
    assert f"job {run.info.job_id} failed" not in log, log
    # the first run stopped early (common.sh forwards the warning once the trainer's handler
    # is installed) and the requeued run resumed from the newest published checkpoint: the
    # cancelled job's 16, or one the first run saved when it stopped
    newest = re.findall(r"newest (?:published )?checkpoint[:,]? iteration (\d+)", first_run)[-1]
    loaded = re.search(r"loaded checkpoint \S+/iter_(\d+) at iteration (\d+) ", second_run)
    assert loaded and loaded.group(2) == newest, (newest, second_run[-3000:])
    assert 16 <= int(newest) < TRAIN_ITERS, f"the warning did not stop the first run: {log}"
    assert_reference_losses(run, reference, range(17, TRAIN_ITERS + 1))


# --------------------------------------------------------------------------------------------
# The GPU scripts on common 8-GPU nodes (sbatch's checks, no job runs)
# --------------------------------------------------------------------------------------------


def test_gpu_scripts_are_accepted_on_8_gpu_nodes_with_96_cpus(slurm, tmp):
    """``gpu[01-08]`` have 8 GPUs and 96 CPUs (AWS p4d, Azure ND H100 v5); their partition is
    DOWN, so the jobs only queue. sbatch rejects at submission what no node could run."""
    common = ["--partition=gpu", "--output=/dev/null"]
    for script in GPU_SCRIPTS:
        path = f"examples/slurm/{script}"
        job = slurm.sbatch(*common, path, cwd=ROOT, env=job_env(tmp / "never"))
        info = slurm.job(job)
        slurm.run("scancel", str(job))
        assert "gres/gpu=" in info.raw or "gpu:8" in info.raw, info.raw
        # the override the scripts document is accepted when it fits ...
        job = slurm.sbatch(*common, "--cpus-per-task=12", path, cwd=ROOT)
        slurm.run("scancel", str(job))
        # ... and the node really refuses what does not (16 CPUs x 8 tasks > 96)
        refused = slurm.run("sbatch", *common, "--cpus-per-task=16", path, cwd=ROOT, check=False)
        assert refused.returncode != 0, script
        assert "Requested node configuration is not available" in refused.stderr, refused.stderr


# --------------------------------------------------------------------------------------------
# common.sh without Slurm (bash only): what it passes to srun
# --------------------------------------------------------------------------------------------


def _run_common_sh(tmp: Path, env: dict[str, str],
                   script: str = "run_pretrain --flag value") -> list[str]:  # fmt: skip
    """Source common.sh with stub ``srun``/``scontrol`` and run ``script`` (by default
    run_pretrain); returns srun's arguments, or ``script``'s output lines."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$SRUN_ARGS"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node001\n")
    for stub in ("srun", "scontrol"):
        (bin_dir / stub).chmod(0o755)
    args_file = tmp / "srun_args"
    base = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_ARGS": str(args_file),
        "REPO": str(ROOT), "CKPT_ROOT": str(tmp / "ckpt"), "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "node001", "SLURM_NNODES": "4", "SLURM_NTASKS": "32",
        "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_ON_NODE": "96",
    }  # fmt: skip
    command = f'source "$REPO/examples/slurm/common.sh"; {script}'
    proc = subprocess.run(["bash", "-c", command], env=base | env, check=True, timeout=60,
                          capture_output=True, text=True)  # fmt: skip
    if not script.startswith("run_pretrain"):
        return proc.stdout.splitlines()
    return args_file.read_text().split("\0")[:-1]


def test_master_port_is_below_the_ephemeral_range(tmp_path):
    """10000-32767 from the job id: no overlap with Linux's ephemeral 32768-60999."""
    ids = [0, 1, 7, 22767, 22768, 22769, 99999, 123456789, 2**31 - 1]
    lines = _run_common_sh(tmp_path, {}, 'echo "$MASTER_PORT"; for id in '
                           + " ".join(map(str, ids)) + '; do master_port "$id"; done')  # fmt: skip
    assert lines[0] == "10007"  # SLURM_JOB_ID=7
    ports = [int(line) for line in lines[1:]]
    assert ports == [10000 + i % 22768 for i in ids]
    assert all(10000 <= port <= 32767 for port in ports) and max(ports) == 32767
    assert _run_common_sh(tmp_path, {"MASTER_PORT": "45678"}, 'echo "$MASTER_PORT"') == ["45678"]


def test_common_sh_runs_the_image_python_in_a_container(tmp_path):
    """``TST_PYTHON`` outside containers; inside, the image's ``python``: a host ``PYTHON``
    (or ``TST_PYTHON``) never reaches the container."""
    host = {"PYTHON": "/host/bin/python3", "TST_PYTHON": "/host/venv/bin/python"}
    image = {"CONTAINER_IMAGE": "nvcr.io/nvidia/pytorch:25.01-py3"}

    def python_run(env):  # srun ... bash -c SCRIPT REPO PYTHON --flag value
        args = _run_common_sh(tmp_path, env)
        assert args[-4] == str(ROOT) and 'exec "$1" pretrain_tst.py' in args[-5], args
        return args[-3]

    assert python_run(image | host) == "python"
    assert python_run(host) == "/host/venv/bin/python"
    assert python_run({"PYTHON": "/host/bin/python3"}) == "python"
    assert "$PYTHON" not in (SLURM_DIR / "common.sh").read_text()
    assert "{PYTHON" not in (SLURM_DIR / "common.sh").read_text()


def test_common_sh_passes_cpus_per_task_to_srun(tmp_path):
    # no --cpus-per-task from sbatch: the node's CPUs shared by its tasks
    assert "--cpus-per-task=12" in _run_common_sh(tmp_path, {})
    # sbatch --cpus-per-task=N (SLURM_CPUS_PER_TASK), and CPUS_PER_TASK above it
    assert "--cpus-per-task=7" in _run_common_sh(tmp_path, {"SLURM_CPUS_PER_TASK": "7"})
    args = _run_common_sh(tmp_path, {"SLURM_CPUS_PER_TASK": "7", "CPUS_PER_TASK": "3"})
    assert "--cpus-per-task=3" in args and args[-2:] == ["--flag", "value"], args


def test_common_sh_container_mounts_only_existing_data_dirs(tmp_path):
    (tmp_path / "data").mkdir()
    env = {"CONTAINER_IMAGE": "nvcr.io/nvidia/pytorch:25.01-py3",
           "CONTAINER_DATA_DIRS": f"{tmp_path}/data {tmp_path}/models"}  # fmt: skip
    args = _run_common_sh(tmp_path, env)
    mounts = next(a for a in args if a.startswith("--container-mounts=")).split("=", 1)[1]
    ckpt = tmp_path / "ckpt"
    assert mounts.split(",") == [f"{ROOT}:{ROOT}", f"{ckpt}:{ckpt}",
                                 f"{tmp_path}/data:{tmp_path}/data"], mounts  # fmt: skip
    assert ckpt.is_dir()  # created, so that pyxis can mount it
    assert "--container-image=nvcr.io/nvidia/pytorch:25.01-py3" in args


def test_sbatch_scripts_share_the_launcher_and_the_signal_route():
    """The CPU job and the GPU scripts differ only in resources and model flags."""
    for script in ("cpu_smoke.sbatch", *GPU_SCRIPTS):
        text = (SLURM_DIR / script).read_text()
        for line in ("#SBATCH --requeue", "#SBATCH --open-mode=append",
                     'source "$REPO/examples/slurm/common.sh"',
                     "--exit-signal-handler --exit-signal SIGUSR1"):  # fmt: skip
            assert line in text, (script, line)
        assert re.search(r"#SBATCH --signal=B:USR1@\d+", text), script
        assert re.search(r'--save "\$CKPT" --load "\$CKPT"', text), script
        assert "#SBATCH --cpus-per-task" not in text or script == "cpu_smoke.sbatch", script
