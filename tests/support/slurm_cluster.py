"""A one-node Slurm cluster for the tests: MUNGE, slurmctld and slurmd, all state in one dir.

Debian's packages (``slurmctld slurmd slurm-client munge``, Slurm 22.05; installed by
``scripts/setup_slurm.sh``) provide the binaries; nothing of the system's own configuration or
services is used. `LocalSlurm.start` writes a ``slurm.conf`` for this host (its real CPU
topology, from ``slurmd -C`` and the CPUs this process may use), starts the three daemons in
the foreground and remembers their pids; `LocalSlurm.stop` cancels what is left of the jobs
and stops the daemons by pid. Clients find the cluster through ``SLURM_CONF`` (`env`).

Besides the node that runs jobs (partition ``cpu``, the default), the configuration declares
``gpu[01-08]``: 8-GPU nodes with 96 CPUs (as AWS p4d or Azure ND H100 v5) in partition
``gpu``, which is DOWN: jobs queue there but never start. The nodes themselves are up (this
host's slurmd answers for them), so ``sbatch`` judges the GPU scripts' resource requests
against a common 8-GPU node and rejects at submission what no node could run ("Requested
node configuration is not available"), as a production cluster does.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.support.multirank import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}  # fmt: skip
GPU_NODES = "gpu[01-08]"
GPU_NODE_CPUS = 96
# Requeued jobs become eligible again after AuthInfo's cred_expire (default 120 s); 5 s keeps
# the requeue tests short and still outlasts launching a step on this host.
CRED_EXPIRE_S = 5


class SlurmUnavailable(RuntimeError):
    """A local Slurm cannot be started here; the message says why."""


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def unavailable_reason() -> str | None:
    """Why a local Slurm cannot run on this machine, or None when it can."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "a local Slurm needs Linux"
    missing = [name for name in (*DAEMONS, *CLIENTS) if _which(name) is None]
    if missing:
        return (
            f"Slurm/MUNGE not installed ({', '.join(missing)} missing): run "
            "scripts/setup_slurm.sh as root (Debian/Ubuntu: slurmctld slurmd slurm-client munge)"
        )
    if os.geteuid() != 0:
        return "a local Slurm needs root (slurmd starts the jobs' processes)"
    try:
        socket.gethostbyname(socket.gethostname())
    except OSError as err:
        return f"this host's name {socket.gethostname()!r} does not resolve ({err})"
    if len(os.sched_getaffinity(0)) < 2:
        return "the Slurm tests run 2-task jobs: this machine has fewer than 2 usable CPUs"
    return None


def node_line(name: str) -> str:
    """``NodeName=...`` for this host: ``slurmd -C``'s topology, or the usable CPU count when
    this process may use fewer CPUs than the host has (a container's CPU set)."""
    usable = len(os.sched_getaffinity(0))
    probe = subprocess.run(
        [_which("slurmd"), "-C"], capture_output=True, text=True, timeout=60, check=False
    )
    fields = dict(re.findall(r"(\w+)=(\S+)", probe.stdout.splitlines()[0] if probe.stdout else ""))
    topology = ""
    if fields.get("CPUs", "").isdigit() and int(fields["CPUs"]) <= usable:
        keys = ("Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
        topology = "".join(f" {key}={fields[key]}" for key in keys if key in fields)
        usable = int(fields["CPUs"])
    memory = fields.get("RealMemory", "1000")
    return (
        f"NodeName={name} NodeAddr=127.0.0.1 CPUs={usable}{topology} RealMemory={memory} "
        "State=UNKNOWN"
    )


@dataclass
class JobInfo:
    """What ``scontrol show job`` says about a job."""

    job_id: int
    state: str
    reason: str
    restarts: int
    exit_code: str
    start_time: str
    end_time: str
    raw: str

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


class LocalSlurm:
    """One slurmctld + one slurmd (+ munged) on this host, configured under ``root``."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="tst-slurm-"))
        self.cluster = "tst" + uuid.uuid4().hex[:6]
        self.node = socket.gethostname()  # the jobs' rendezvous address (MASTER_ADDR)
        self.conf = self.root / "slurm.conf"
        self._procs: dict[str, subprocess.Popen] = {}

    # --- configuration ------------------------------------------------------------------
    def _write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        (self.root / "plugstack.conf").write_text("")
        r = self.root
        ctld_port, slurmd_port = free_port(), free_port()
        self.conf.write_text(
            "\n".join(
                [
                    f"ClusterName={self.cluster}",
                    # common.sh's rendezvous port is 20000 + job id: keep concurrent clusters
                    # apart, and below the ephemeral port range
                    f"FirstJobId={random.randrange(1000, 12000, 100)}",
                    f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
                    f"SlurmctldPort={ctld_port}",
                    f"SlurmdPort={slurmd_port}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={r}/munge/munge.sock,cred_expire={CRED_EXPIRE_S}",
                    f"StateSaveLocation={r}/state",
                    f"SlurmdSpoolDir={r}/spool/%n",
                    f"SlurmctldPidFile={r}/slurmctld.pid",
                    f"SlurmdPidFile={r}/slurmd.pid",
                    f"SlurmctldLogFile={r}/log/slurmctld.log",
                    f"SlurmdLogFile={r}/log/slurmd.log",
                    f"PlugStackConfig={r}/plugstack.conf",
                    "MailProg=/bin/true",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/affinity",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "MpiDefault=none",
                    "SchedulerType=sched/backfill",
                    # a requeued job is started when it becomes eligible, not a minute later
                    "SchedulerParameters=sched_interval=1,bf_interval=1",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "EnforcePartLimits=ALL",
                    "ReturnToService=2",
                    "KillWait=5",
                    "InactiveLimit=0",
                    "MinJobAge=3600",
                    "GresTypes=gpu",
                    node_line(self.node),
                    f"NodeName={GPU_NODES} NodeAddr=127.0.0.1 "
                    f"CPUs={GPU_NODE_CPUS} Boards=1 SocketsPerBoard=2 "
                    f"CoresPerSocket={GPU_NODE_CPUS // 2} ThreadsPerCore=1 RealMemory=1000000 "
                    "Gres=gpu:8 State=UNKNOWN",
                    f"PartitionName=cpu Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
                    f"PartitionName=gpu Nodes={GPU_NODES} MaxTime=INFINITE State=DOWN",
                    "",
                ]
            )
        )
        (r / "spool" / self.node).mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands (and the jobs they submit)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # --- daemons ------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        """Write the configuration, start munged, slurmctld and slurmd; wait for the node.

        Raises:
            SlurmUnavailable: naming the daemon that did not come up, with its log's tail.
        """
        reason = unavailable_reason()
        if reason:
            raise SlurmUnavailable(reason)
        self._write_config()
        r = self.root
        self._spawn(
            "munged",
            [_which("munged"), "--foreground", "--force", f"--key-file={r}/munge/munge.key",
             f"--socket={r}/munge/munge.sock", f"--pid-file={r}/munge/munged.pid",
             f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/munged.seed"],
        )  # fmt: skip
        self._wait(lambda: (r / "munge" / "munge.sock").exists(), "munged", timeout)
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._scontrol_ok("ping"), "slurmctld", timeout)
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(self._node_ready, "slurmd", timeout)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")  # noqa: SIM115 (daemon-long)
        self._procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()

    def _wait(self, ready, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._procs[name].poll() is not None:
                timeout = 0
                break
            if ready():
                return
            time.sleep(0.2)
        tail = self.log_tail(name)
        self.stop()
        when = f"within {timeout:g} s" if timeout else "(it exited)"
        raise SlurmUnavailable(f"{name} did not come up {when}: {tail}")

    def log_tail(self, name: str, lines: int = 15) -> str:
        texts = []
        for path in (self.root / "log" / f"{name}.out", self.root / "log" / f"{name}.log"):
            if path.exists():
                texts += path.read_text(errors="replace").splitlines()[-lines:]
        return " | ".join(texts)

    def _scontrol_ok(self, *args: str) -> bool:
        return self.run("scontrol", *args, check=False).returncode == 0

    def _node_ready(self) -> bool:
        """Every node registered (gpu[01-08] answer through this host's slurmd)."""
        out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
        return bool(out) and all(
            state.rstrip("*") in {"idle", "mixed", "allocated"} for state in out
        )

    def stop(self) -> None:
        """Cancel every job, let their processes end, then stop the daemons by pid."""
        if "slurmd" in self._procs and self._procs["slurmd"].poll() is None:
            self.run("scancel", "--full", f"--user={os.geteuid()}", check=False)
            deadline = time.monotonic() + 30
            while (
                time.monotonic() < deadline
                and self.run("squeue", "-h", "-t", "RUNNING,COMPLETING", check=False).stdout.strip()
            ):
                time.sleep(0.5)
            self.signal_processes_of_cluster(signal.SIGKILL)
        for name in reversed(DAEMONS):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)

    def __enter__(self) -> LocalSlurm:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- clients ------------------------------------------------------------------------
    def run(
        self, *cmd: str, env: dict | None = None, cwd: Path | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Run a client command (``sbatch``, ``scontrol``, ...) against this cluster."""
        return subprocess.run(
            cmd, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
            timeout=60, check=check,
        )  # fmt: skip

    def sbatch(self, *args: str, env: dict | None = None, cwd: Path | None = None) -> int:
        """Submit (``sbatch --parsable ARGS``); returns the job id."""
        out = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> JobInfo:
        raw = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout.strip()

        def field(key: str) -> str:
            match = re.search(rf"(?:^| ){key}=(\S*)", raw)
            return match.group(1) if match else ""

        return JobInfo(
            job_id=job_id,
            state=field("JobState"),
            reason=field("Reason"),
            restarts=int(field("Restarts") or 0),
            exit_code=field("ExitCode"),
            start_time=field("StartTime"),
            end_time=field("EndTime"),
            raw=raw,
        )

    def wait_until(self, job_id: int, condition, timeout: float, poll: float = 0.2) -> JobInfo:
        """Poll the job until ``condition(JobInfo)``; TimeoutError names its last state."""
        deadline = time.monotonic() + timeout
        info = self.job(job_id)
        while not condition(info):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} after {timeout:g} s: {info.raw}")
            time.sleep(poll)
            info = self.job(job_id)
        return info

    def wait_finished(self, job_id: int, timeout: float) -> JobInfo:
        return self.wait_until(job_id, lambda info: info.finished, timeout, poll=0.5)

    def signal_processes_of_cluster(self, sig: int = signal.SIGKILL) -> None:
        """Last resort after a failed test: signal every process a job of this cluster left."""
        import psutil

        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.environ().get("SLURM_CLUSTER_NAME") == self.cluster:
                    proc.send_signal(sig)
