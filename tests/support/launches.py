"""Real launches of ``pretrain_tst.py`` for the reliability tests, and faults from outside.

`launch` starts a tiny-model run the way a cluster would and waits for it:

* ``via="torchrun"`` (default for several ranks): ``python -m torch.distributed.run``;
* ``via="direct"`` (default for one rank): one process per rank with the environment
  ``srun`` + ``examples/slurm/common.sh`` give each task (``RANK``, ``WORLD_SIZE``, ...),
  each in its own session as Slurm tasks are;
* ``via="wrapper"``: ``tools/launch.py`` around torchrun;
* ``via="bare"`` (one rank): ``python pretrain_tst.py`` without any launcher environment.

While it runs, ``during(handle)`` may act on it from outside: wait for a checkpoint, signal the
launcher, every worker's process group (as torchrun does) or every process of the launch (as
Slurm does for a job step), start a second job. Every process of one launch carries
`LAUNCH_ENV` in its environment; whatever is left running afterwards is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.support.multirank import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "pretrain_tst.py"
LAUNCH_PY = ROOT / "tools" / "launch.py"
MODEL = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--transformer-impl", "local", "--distributed-backend", "gloo",
    "--seed", "5",
]  # fmt: skip
TRAIN = [
    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--min-lr", "3e-4",
    "--lr-warmup-iters", "2", "--train-iters", "8", "--log-interval", "1", "--eval-iters", "0",
]  # fmt: skip
TST = ["--tst-bag-size", "4", "--tst-phase1-fraction", "0.5"]  # phase 1 = iterations 1-4
MOCK = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512"]
DP2 = ["--use-distributed-optimizer"]
ERROR = "pretrain_tst.py: error: "
LAUNCH_ENV = "TST_TEST_LAUNCH"  # marks the processes of one launch
FAULT_ENV = "TST_FAULT_INJECT"  # tst_megatron.training.fault_injection.ENV


@dataclass
class Launch:
    """What one launch left behind."""

    returncode: int  # the launcher's; with via="direct", the first non-zero rank's (else 0)
    log: str
    records: list[dict]
    seconds: float
    rank_returncodes: list[int] = field(default_factory=list)  # via="direct" only

    @property
    def losses(self) -> dict[int, float]:
        return {r["iteration"]: r["lm_loss"] for r in self.records if "lm_loss" in r}


@dataclass
class Running:
    """A launch in progress, for ``during``."""

    procs: list[subprocess.Popen]  # the launcher, or every rank with via="direct"
    marker: str
    save: Path | None

    def processes(self) -> list[psutil.Process]:
        """Every live process of this launch (launchers, ranks, their helper processes)."""
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.environ().get(LAUNCH_ENV) == self.marker:
                    found.append(proc)
        return found

    def workers(self) -> list[psutil.Process]:
        """The live processes running pretrain_tst.py's main: not launchers, not helpers
        (spawned helpers run ``multiprocessing`` code; forked ones, such as Megatron-Core's
        checkpoint writers, have a rank as their parent)."""
        found = []
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                cmd = proc.cmdline()
                if (
                    proc.status() != psutil.STATUS_ZOMBIE
                    and str(SCRIPT) in cmd
                    and "torch.distributed.run" not in cmd  # torchrun
                    and str(LAUNCH_PY) not in cmd  # tools/launch.py (names the script too)
                    and not any("multiprocessing" in part for part in cmd)
                ):
                    found.append(proc)
        pids = {proc.pid for proc in found}
        ranks = []
        for proc in found:
            with contextlib.suppress(psutil.Error):
                if proc.ppid() not in pids:
                    ranks.append(proc)
        return ranks

    def signal_every_process(self, signum: int) -> None:
        """What Slurm does for a job step (``scancel --signal``, preemption, srun forwarding)."""
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signum)

    def signal_worker_groups(self, signum: int) -> None:
        """What torchrun does on SIGTERM: ``os.killpg`` of each worker's process group."""
        for pgid in {os.getpgid(proc.pid) for proc in self.workers()}:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signum)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("the launch never reached the expected state")
            if all(proc.poll() is not None for proc in self.procs):
                raise RuntimeError("the launch ended before the expected state")
            time.sleep(0.05)

    def wait_for_checkpoint(self, iteration: int, timeout: float = 240) -> None:
        """Until ``--save``'s tracker names ``iteration``."""
        tracker = self.save / "latest_checkpointed_iteration.txt"

        def published() -> bool:
            with contextlib.suppress(OSError, ValueError):
                return int(tracker.read_text()) >= iteration
            return False

        self.wait_for(published, timeout)


def kill_leftovers(marker: str) -> None:
    """Kill what a launch left running: its processes carry ``marker``."""
    for proc in Running([], marker, None).processes():
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _save_dir(args: list[str], cwd: Path) -> Path | None:
    """The ``--save`` directory of ``args`` as the launched ranks read it: the last one given
    (``--save DIR`` or ``--save=DIR``, as argparse takes it), relative to their ``cwd``."""
    save = None
    for i, arg in enumerate(args):
        if arg == "--save" and i + 1 < len(args):
            save = args[i + 1]
        elif arg.startswith("--save="):
            save = arg.removeprefix("--save=")
    return None if save is None else cwd / save


def launch(
    tmp: Path, name: str, extra: list[str], nproc: int = 1, fault: str | None = None,
    data: list[str] = MOCK, timeout: float = 300, via: str | None = None,
    during: Callable[[Running], None] | None = None, env: dict[str, str] | None = None,
    base: list[str] | None = None,
) -> Launch:
    """Run pretrain_tst.py on ``nproc`` gloo ranks with ``TST_FAULT_INJECT=fault``.

    ``base`` replaces the default tiny model + schedule + TST flags; ``extra`` comes last.
    """
    via = via or ("direct" if nproc == 1 else "torchrun")
    metrics = tmp / f"{name}.jsonl"
    args = [*(base if base is not None else [*MODEL, *TRAIN, *TST]), *data,
            "--metrics-jsonl", str(metrics), *extra]
    port = str(free_port())
    marker = f"{name}-{uuid.uuid4()}"
    run_env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
               LAUNCH_ENV: marker, **(env or {})}
    run_env.pop(FAULT_ENV, None)
    if fault:
        run_env[FAULT_ENV] = fault
    torchrun = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-port", port]
    commands, envs = [], []
    if via == "bare":  # `python pretrain_tst.py ...` without any launcher environment
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
            run_env.pop(key, None)
        commands.append([sys.executable, str(SCRIPT), *args])
        envs.append(run_env)
    elif via == "direct":
        for rank in range(nproc):
            commands.append([sys.executable, str(SCRIPT), *args])
            envs.append(run_env | {
                "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
            })
    elif via == "torchrun":
        commands.append([sys.executable, *torchrun, str(SCRIPT), *args])
        envs.append(run_env)
    elif via == "wrapper":
        commands.append([sys.executable, str(LAUNCH_PY), *torchrun[2:],
                         str(SCRIPT), *args])
        envs.append(run_env)
    else:
        raise ValueError(f"via must be direct, bare, torchrun or wrapper, got {via!r}")
    start = time.monotonic()
    with open(tmp / f"{name}.log", "w+") as log:
        procs = [
            subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=cmd_env, cwd=tmp,
                             start_new_session=via in ("direct", "bare"))
            for cmd, cmd_env in zip(commands, envs, strict=True)
        ]
        try:
            if during is not None:
                during(Running(procs, marker, _save_dir(args, tmp)))
            deadline = time.monotonic() + timeout
            codes = [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in procs]
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    if proc.poll() is None:
                        proc.kill()
            kill_leftovers(marker)
        seconds = time.monotonic() - start
        log.seek(0)
        output = log.read()
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if (
        metrics.exists()
    ) else []
    per_rank = via in ("direct", "bare")
    returncode = next((code for code in codes if code), 0) if per_rank else codes[0]
    return Launch(returncode, output, records, seconds, codes if per_rank else [])


def listing(save: Path) -> tuple[str | None, set[str]]:
    """(tracker contents, names in the save directory besides the tracker and the lock)."""
    tracker = save / "latest_checkpointed_iteration.txt"
    hidden = {tracker.name, ".tst_save.lock"}
    names = {p.name for p in save.iterdir()} - hidden if save.is_dir() else set()
    return (tracker.read_text().strip() if tracker.exists() else None), names


def iters(*numbers: int) -> set[str]:
    return {f"iter_{n:07d}" for n in numbers}


def assert_same_losses(run: Launch, reference: Launch, iterations: range) -> None:
    assert sorted(run.losses) == list(iterations), run.log[-3000:]
    for it in iterations:
        assert run.losses[it] == reference.losses[it], it  # bit-for-bit on CPU
