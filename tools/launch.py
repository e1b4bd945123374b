"""torchrun for preemptible jobs: exit signals go to the workers, the exit code stays theirs.

    python tools/launch.py --nproc-per-node 8 [torchrun flags] pretrain_tst.py \\
        --exit-signal-handler [--exit-signal SIGUSR1] ...

Plain ``torchrun`` is a poor target for a preemption signal (see docs/reliability.md,
"Signal routes"): on SIGTERM it forwards the signal to the workers, waits for them, and then
exits 1 with a ``SignalException`` even when every worker saved and exited 0, so a requeue
wrapper that checks for 0 does not requeue; SIGUSR1 kills it at once. This wrapper runs
torchrun with every signal in `FORWARDED` ignored (and out of ``TORCHELASTIC_SIGNALS_TO_HANDLE``)
and forwards each signal it receives to the worker processes instead, as soon as a worker has
installed its handler (a worker that never does gets it 10 s after it started): SIGHUP,
SIGINT (Ctrl-C), SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGALRM. With ``--exit-signal-handler``
the workers save at the next step boundary and exit 0, torchrun sees a successful run, and
this wrapper exits with torchrun's status; other signals end the workers by their default
action. The signal may reach the wrapper alone (``kill``, Kubernetes) or every process of the
job (Slurm): torchrun ignores it either way. Nothing outlives the wrapper: torchrun gets
SIGKILL when the wrapper dies (even of kill -9) and the workers when torchrun dies
(`tst_megatron.training.parent_death`). Linux only (/proc, prctl).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tst_megatron.training.exit_signals import SHIELDED_ENV
from tst_megatron.training.parent_death import set_parent_death_signal
from tst_megatron.training.placement import CUDA_CONNECTIONS

FORWARDED = (
    signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1,
    signal.SIGUSR2, signal.SIGALRM,
)  # fmt: skip  (every catchable signal that asks a process to stop or to act)
TORCHRUN_DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"  # torchrun's --signals-to-handle
# torchrun logs a traceback for an empty list: it keeps one that nobody sends a job
TORCHRUN_PLACEHOLDER_SIGNAL = "SIGXCPU"
SIGNALS_FLAGS = ("--signals-to-handle", "--signals_to_handle")
NPROC_FLAGS = ("--nproc-per-node", "--nproc_per_node")
NPROC_NAMES = ("cpu", "gpu", "xpu", "auto")
UNCAUGHT_GRACE_S = 10.0


def _without_forwarded(names: str) -> str:
    forwarded = {sig.name for sig in FORWARDED}
    kept = [n.strip() for n in names.split(",") if n.strip() and n.strip() not in forwarded]
    return ",".join(kept) or TORCHRUN_PLACEHOLDER_SIGNAL


def check_nproc(argv: list[str]) -> str | None:
    """A problem with torchrun's ``--nproc-per-node`` in ``argv`` (None if fine or absent)."""
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            return None  # the training script: its own flags follow
        name, has_value, value = arg.partition("=")
        if name not in NPROC_FLAGS:
            continue
        if not has_value:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if value in NPROC_NAMES or (value.isdigit() and int(value) >= 1):
            continue
        return (
            f"{name} {value!r}: give a number of processes >= 1, or one of "
            f"{', '.join(NPROC_NAMES)}"
        )
    return None


def torchrun_command(argv: list[str], environ: dict[str, str]) -> tuple[list[str], dict]:
    """torchrun's command line and environment: it handles none of `FORWARDED` (its
    ``--signals-to-handle`` / ``PET_SIGNALS_TO_HANDLE`` lose them); workers restore them."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg in SIGNALS_FLAGS and i + 1 < len(argv):
            argv[i + 1] = _without_forwarded(argv[i + 1])
        elif arg.partition("=")[0] in SIGNALS_FLAGS:
            flag, _, value = arg.partition("=")
            argv[i] = f"{flag}={_without_forwarded(value)}"
        elif not arg.startswith("-"):
            break  # the training script: its own flags follow
    handled = environ.get("PET_SIGNALS_TO_HANDLE", TORCHRUN_DEFAULT_SIGNALS)
    env = environ | {
        # Megatron-LM: one hardware queue for TP/CP overlap (before Blackwell), in the
        # environment before CUDA starts; a value already exported (Megatron-FSDP) stays
        CUDA_CONNECTIONS: environ.get(CUDA_CONNECTIONS, "1"),
        "PET_SIGNALS_TO_HANDLE": _without_forwarded(handled),
        SHIELDED_ENV: ",".join(sorted(sig.name for sig in FORWARDED)),
    }
    return [sys.executable, "-m", "torch.distributed.run", *argv], env


def _start_torchrun(launcher_pid: int):
    """``preexec_fn`` of torchrun: ignore `FORWARDED`, die with the wrapper."""

    def start() -> None:
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_IGN)
        set_parent_death_signal(launcher_pid)

    return start


def _catches(pid: int, signum: int) -> bool:
    """Whether ``pid`` has a handler for ``signum`` (the ``SigCgt`` mask of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(line for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)


class Forwarder:
    """Signals received by this process, delivered once to every worker of torchrun."""

    def __init__(self, torchrun_pid: int) -> None:
        self.torchrun = psutil.Process(torchrun_pid)
        self.pending: list[int] = []
        self.delivered: set[tuple[int, int]] = set()

    def receive(self, signum: int, frame) -> None:
        if signum not in self.pending:
            self.pending.append(signum)
        print(
            f"tools/launch.py: received {signal.Signals(signum).name}: forwarding it to the "
            "workers",
            file=sys.stderr,
            flush=True,
        )
        self.delivered = {(pid, sig) for pid, sig in self.delivered if sig != signum}
        self.deliver()

    def deliver(self) -> None:
        if not self.pending:
            return
        try:
            workers = self.torchrun.children()
        except psutil.Error:
            return
        for worker in workers:
            for signum in self.pending:
                if (worker.pid, signum) in self.delivered:
                    continue
                try:
                    ready = _catches(worker.pid, signum) or (
                        time.time() - worker.create_time() > UNCAUGHT_GRACE_S
                    )
                    if ready:
                        worker.send_signal(signum)
                        self.delivered.add((worker.pid, signum))
                except psutil.Error:
                    continue


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    problem = check_nproc(argv)
    if problem:
        print(f"tools/launch.py: error: {problem}", file=sys.stderr)
        return 2
    command, env = torchrun_command(argv, dict(os.environ))
    pending: list[int] = []  # a signal that arrives before torchrun runs is forwarded later
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    torchrun = subprocess.Popen(command, env=env, preexec_fn=_start_torchrun(os.getpid()))
    forwarder = Forwarder(torchrun.pid)
    for sig in FORWARDED:
        signal.signal(sig, forwarder.receive)
    for signum in pending:
        forwarder.receive(signum, None)
    while torchrun.poll() is None:
        forwarder.deliver()
        time.sleep(0.2)
    code = torchrun.returncode
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
