"""Exit signals delivered from outside, the way launchers and clusters deliver them.

Each route of `docs/reliability.md` ("Signal routes") is one real launch of a 2-rank run
(DP=2, distributed optimizer, tiny model) whose steps are slowed down
(``TST_FAULT_INJECT=slow_steps``) so the signal lands mid-run: to ``torchrun`` itself, to
every worker's process group (what torchrun does on SIGTERM), to every process of the job
(what Slurm does for a job step), during start-up, and to ``tools/launch.py``. The run must
save at the next step boundary, exit as documented, and a resume must reproduce the
uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from tests.support.launches import (
    DP2,
    Launch,
    Running,
    assert_same_losses,
    iters,
    launch,
    listing,
)

SLOW = "slow_steps:0.5"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("signals")


@pytest.fixture(scope="module")
def reference(tmp) -> Launch:
    """The uninterrupted run (8 iterations), launched like Slurm tasks."""
    run = launch(tmp, "reference", DP2, nproc=2, via="direct")
    assert run.returncode == 0, run.log[-3000:]
    return run


def exit_iteration(run: Launch, signal_name: str) -> int:
    found = re.findall(rf"exiting at iteration (\d+): received {signal_name}\b", run.log)
    assert len(found) == 1, run.log[-4000:]
    return int(found[0])


def assert_clean_exit_save(
    run: Launch, save: Path, signal_name: str, launcher_tracebacks: int = 0
) -> int:
    """The run saved at the step after the signal, published it, and no rank failed.

    The signal is sent once checkpoint 2 is published; on a busy machine it can land before
    the trainer's exit check of that same iteration, which then exits at 2 without saving
    again (the save of that step is already there): iteration 2 is a valid answer."""
    iteration = exit_iteration(run, signal_name)
    assert 2 <= iteration < 8
    assert run.log.count("Traceback") == launcher_tracebacks, run.log[-4000:]
    assert "BrokenPipeError" not in run.log
    saved = {2 * k for k in range(1, iteration // 2 + 1)} | {iteration}
    assert listing(save) == (str(iteration), iters(*saved))
    return iteration


def signal_after_first_save(action):
    def during(running: Running) -> None:
        running.wait_for_checkpoint(2)
        action(running)

    return during


@pytest.fixture(scope="module")
def torchrun_sigterm(tmp) -> tuple[Launch, Path]:
    """SIGTERM to the torchrun process after the first save (torchrun then sends it to each
    worker's process group, Megatron-Core's checkpoint-writer helper included)."""
    save = tmp / "torchrun_sigterm"
    run = launch(
        tmp, "torchrun_sigterm",
        [*DP2, "--save", str(save), "--save-interval", "2", "--exit-signal-handler"],
        nproc=2, fault=SLOW,
        during=signal_after_first_save(lambda r: r.procs[0].send_signal(signal.SIGTERM)),
    )
    return run, save


def test_sigterm_to_torchrun_saves_on_every_rank_and_resumes_exactly(
    torchrun_sigterm, reference, tmp
):
    run, save = torchrun_sigterm
    iteration = assert_clean_exit_save(run, save, "SIGTERM", launcher_tracebacks=1)
    # torchrun itself reports the signal as a failure, although every worker exited 0
    assert run.returncode == 1
    assert "SignalException: Process" in run.log and "got signal: 15" in run.log
    assert_same_losses(run, reference, range(1, iteration + 1))
    resumed = launch(tmp, "torchrun_resumed", [*DP2, "--load", str(save)], nproc=2, via="direct")
    assert resumed.returncode == 0, resumed.log[-3000:]
    assert_same_losses(resumed, reference, range(iteration + 1, 9))


def test_signal_to_every_worker_process_group_saves(tmp, reference):
    """``os.killpg`` of each worker's group: the exit save survives (the writer helper lives
    in that group and ignores the signal)."""
    save = tmp / "killpg"
    run = launch(
        tmp, "killpg",
        [*DP2, "--save", str(save), "--save-interval", "2", "--exit-signal-handler"],
        nproc=2, fault=SLOW, via="direct",
        during=signal_after_first_save(lambda r: r.signal_worker_groups(signal.SIGTERM)),
    )
    assert run.returncode == 0 and run.rank_returncodes == [0, 0], run.log[-3000:]
    iteration = assert_clean_exit_save(run, save, "SIGTERM")
    assert_same_losses(run, reference, range(1, iteration + 1))


def test_sigusr1_to_every_process_of_a_slurm_like_step_saves(tmp, reference):
    """What ``scancel --signal=USR1`` / ``srun`` forwarding do: every process of the step
    (ranks and their helper processes) receives the signal."""
    save = tmp / "slurm_step"
    run = launch(
        tmp, "slurm_step",
        [*DP2, "--save", str(save), "--save-interval", "2", "--exit-signal-handler",
         "--exit-signal", "SIGUSR1"],
        nproc=2, fault=SLOW, via="direct",
        during=signal_after_first_save(lambda r: r.signal_every_process(signal.SIGUSR1)),
    )
    assert run.returncode == 0 and run.rank_returncodes == [0, 0], run.log[-3000:]
    iteration = assert_clean_exit_save(run, save, "SIGUSR1")
    assert_same_losses(run, reference, range(1, iteration + 1))


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``signum`` (/proc SigCgt)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(mask >> (signum - 1) & 1)


def test_signal_during_start_up_exits_cleanly_before_the_first_step(tmp):
    """SIGUSR1 to every process while the ranks are still importing and building: recorded,
    not fatal ("User defined signal 1"); both ranks exit 0 before their first step."""
    save = tmp / "start_up"

    def during(running: Running) -> None:
        running.wait_for(
            lambda: len(running.workers()) == 2
            and all(_catches(p.pid, signal.SIGUSR1) for p in running.workers()),
            timeout=60,
        )
        time.sleep(0.2)
        running.signal_every_process(signal.SIGUSR1)

    run = launch(
        tmp, "start_up",
        [*DP2, "--save", str(save), "--save-interval", "2", "--exit-signal-handler",
         "--exit-signal", "SIGUSR1"],
        nproc=2, via="direct", during=during,
    )
    assert run.rank_returncodes == [0, 0], run.log[-3000:]
    assert (
        "exiting at iteration 0 before the first step: received SIGUSR1 during start-up; "
        "nothing new to save" in run.log
    )
    assert not run.losses and listing(save) == (None, set())


def wait_until_gone(running: Running, timeout: float = 20.0) -> float:
    """Seconds until no worker of the launch is left (``inf`` if some still run)."""
    start = time.monotonic()
    while running.workers():
        if time.monotonic() - start > timeout:
            return float("inf")
        time.sleep(0.1)
    return time.monotonic() - start


def test_sigusr1_to_torchrun_kills_it_and_its_workers_with_it(tmp):
    """torchrun handles no SIGUSR1 and dies of it at once; its workers die with it (their
    parent-death signal) instead of training on unsupervised. The published checkpoint stays."""
    save = tmp / "torchrun_usr1"
    gone = []

    def during(running: Running) -> None:
        running.wait_for_checkpoint(2)
        running.procs[0].send_signal(signal.SIGUSR1)
        running.procs[0].wait(timeout=30)
        gone.append(wait_until_gone(running))

    run = launch(
        tmp, "torchrun_usr1",
        [*DP2, "--save", str(save), "--save-interval", "2", "--exit-signal-handler",
         "--exit-signal", "SIGUSR1"],
        nproc=2, fault=SLOW, during=during,
    )
    assert run.returncode == -signal.SIGUSR1
    assert gone[0] < 10, "the workers outlived torchrun"
    tracker, names = listing(save)
    assert int(tracker) >= 2 and f"iter_{int(tracker):07d}" in names


@pytest.mark.parametrize("via", ["torchrun", "wrapper"])
def test_kill_9_of_the_launcher_ends_every_worker(tmp, via):
    """kill -9 of torchrun, or of tools/launch.py (whose torchrun dies with it): the ranks end
    within seconds (``prctl(PR_SET_PDEATHSIG)``)."""
    gone = []

    def during(running: Running) -> None:
        running.wait_for(lambda: len(running.workers()) == 2)
        running.wait_for_checkpoint(1)
        running.procs[0].kill()
        running.procs[0].wait(timeout=30)
        gone.append(wait_until_gone(running))
        gone.append(len(running.processes()))

    save = tmp / f"kill9_{via}"
    run = launch(tmp, f"kill9_{via}", [*DP2, "--save", str(save), "--save-interval", "1"],
                 nproc=2, fault=SLOW, via=via, during=during)  # fmt: skip
    assert run.returncode == -signal.SIGKILL
    assert gone[0] < 10, "the workers outlived their launcher"
    assert gone[1] == 0, "a process of the launch outlived it (torchrun or a helper)"


@pytest.mark.parametrize("name", ["SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR2"])
def test_every_catchable_signal_to_the_launch_wrapper_is_forwarded_without_a_traceback(
    tmp, name
):
    """Ctrl-C, a closed terminal, ...: the wrapper forwards the signal to the workers (their
    exit signal when they handle it: they save and exit 0) and prints no traceback itself."""
    signum = signal.Signals[name]
    handled = name in ("SIGINT", "SIGUSR2")  # the exit signal of this run, or not handled
    save = tmp / f"wrapper_{name}"
    extra = ["--exit-signal-handler", "--exit-signal", name] if handled else []
    # a signal the workers do not catch reaches them only once they are UNCAUGHT_GRACE_S old
    # (before that they may still be importing): slower steps keep the run going past that
    fault = SLOW if handled else "slow_steps:1.5"
    run = launch(
        tmp, f"wrapper_{name}",
        [*DP2, "--save", str(save), "--save-interval", "2", *extra],
        nproc=2, fault=fault, via="wrapper",
        during=signal_after_first_save(lambda r: r.procs[0].send_signal(signum)),
    )
    assert f"tools/launch.py: received {name}: forwarding it to the workers" in run.log
    assert "KeyboardInterrupt" not in run.log
    if handled:
        assert run.returncode == 0, run.log[-3000:]
        assert_clean_exit_save(run, save, name)
    else:  # the workers die of it; torchrun reports their failure, the wrapper its status
        assert run.returncode != 0
        assert f"Signal {signum.value} ({name}) received by PID" in run.log or (
            f"exitcode  : -{signum.value}" in run.log
        ), run.log[-3000:]


def test_launch_wrapper_refuses_an_unusable_process_count(tmp):
    import subprocess
    import sys

    from tests.support.launches import ROOT

    for value in ("zero", "0", "-1"):
        done = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "launch.py"), "--nproc-per-node", value,
             "pretrain_tst.py"], capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2 and done.stderr.strip() == (
            f"tools/launch.py: error: --nproc-per-node {value!r}: give a number of processes "
            ">= 1, or one of cpu, gpu, xpu, auto"
        ), done.stderr


def test_sigusr1_to_torchrun_handling_it_is_forwarded_but_exits_1(tmp, reference):
    """``torchrun --signals-to-handle ...,SIGUSR1``: torchrun forwards it to the worker
    process groups like SIGTERM; the workers save and exit 0, torchrun still exits 1."""
    save = tmp / "torchrun_usr1_handled"
    run = launch(
        tmp, "torchrun_usr1_handled",
        [*DP2, "--save", str(save), "--save-interval", "2", "--exit-signal-handler",
         "--exit-signal", "SIGUSR1"],
        nproc=2, fault=SLOW,
        env={"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"},
        during=signal_after_first_save(lambda r: r.procs[0].send_signal(signal.SIGUSR1)),
    )
    iteration = assert_clean_exit_save(run, save, "SIGUSR1", launcher_tracebacks=1)
    assert run.returncode == 1 and "got signal: 10" in run.log
    assert_same_losses(run, reference, range(1, iteration + 1))


def test_sigusr1_to_the_launch_wrapper_saves_and_exits_zero(tmp, reference):
    """``tools/launch.py``: the signal goes to the workers only; everyone exits 0."""
    save = tmp / "wrapper_usr1"
    run = launch(
        tmp, "wrapper_usr1",
        [*DP2, "--save", str(save), "--save-interval", "2", "--exit-signal-handler",
         "--exit-signal", "SIGUSR1"],
        nproc=2, fault=SLOW, via="wrapper",
        during=signal_after_first_save(lambda r: r.procs[0].send_signal(signal.SIGUSR1)),
    )
    assert run.returncode == 0, run.log[-3000:]
    assert "tools/launch.py: received SIGUSR1: forwarding it to the workers" in run.log
    iteration = assert_clean_exit_save(run, save, "SIGUSR1")
    assert_same_losses(run, reference, range(1, iteration + 1))


def test_sigterm_to_every_process_of_a_wrapper_launch_saves_and_exits_zero(tmp, reference):
    """Slurm preempting a step that runs ``tools/launch.py``: wrapper, torchrun, workers and
    helpers all receive SIGTERM; torchrun ignores it, the workers save, everyone exits 0."""
    save = tmp / "wrapper_step"
    run = launch(
        tmp, "wrapper_step",
        [*DP2, "--save", str(save), "--save-interval", "2", "--exit-signal-handler"],
        nproc=2, fault=SLOW, via="wrapper",
        during=signal_after_first_save(lambda r: r.signal_every_process(signal.SIGTERM)),
    )
    assert run.returncode == 0, run.log[-3000:]
    iteration = assert_clean_exit_save(run, save, "SIGTERM")
    assert_same_losses(run, reference, range(1, iteration + 1))
