"""One writer per ``--save`` directory: an exclusive lock file held for the job's life.

Two jobs saving into one directory (a requeued job while the old one still runs, a copied
launch script) delete each other's staging directories and mix their shard files. Rank 0
of a training job creates ``SAVE/.tst_save.lock`` with ``O_EXCL`` (atomic on local file
systems, NFSv3+ and Lustre), recording who holds it: host, pid and process start time, the
Slurm job id and restart count, the command. A lock left by a process that is gone is stale
and taken over:

* same host, and no process with that pid and start time is running;
* same Slurm job id with a lower ``SLURM_RESTART_COUNT`` (Slurm runs one instance of a job
  at a time: that was this job before its requeue).

Any other holder is treated as alive: the job stops with a message naming it, unless
``--override-save-lock`` is given (for a holder on a node that died). Every publication
re-reads the lock, so a job whose lock was taken over stops instead of publishing.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass

import psutil

from tst_megatron.training.checkpoint_files import CheckpointError

LOCK_NAME = ".tst_save.lock"
OVERRIDE_FLAG = "--override-save-lock"


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a ``--save`` lock."""

    host: str
    pid: int
    pid_started: float
    slurm_job_id: str | None
    slurm_restart_count: int
    started: str
    command: str

    @classmethod
    def this_process(cls) -> LockHolder:
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_started=psutil.Process().create_time(),
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            started=time.strftime("%Y-%m-%d %H:%M:%S"),
            command=" ".join(sys.argv)[:500],
        )

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        if self.slurm_job_id and self.slurm_restart_count:
            job += f" (restart {self.slurm_restart_count})"
        return f"host {self.host}, pid {self.pid}{job}, since {self.started}"

    def is_gone(self, me: LockHolder) -> bool:
        """Whether this holder is certainly not running any more (seen from ``me``)."""
        same_job = bool(self.slurm_job_id) and self.slurm_job_id == me.slurm_job_id
        if same_job and self.slurm_restart_count < me.slurm_restart_count:
            return True
        if self.host != me.host:
            return False
        try:
            return abs(psutil.Process(self.pid).create_time() - self.pid_started) > 1.0
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False


class SaveDirLock:
    """The lock of one ``--save`` directory, held by this process."""

    def __init__(self, save: str, holder: LockHolder) -> None:
        self.path = os.path.join(save, LOCK_NAME)
        self.holder = holder

    @classmethod
    def acquire(cls, save: str, override: bool = False) -> tuple[SaveDirLock, str | None]:
        """Take the lock of ``save`` (created if needed).

        Returns:
            ``(lock, note)``: ``note`` says whose stale (or overridden) lock was taken over.

        Raises:
            CheckpointError: another live job holds it (without ``override``), or the lock
                cannot be written.
        """
        lock = cls(save, LockHolder.this_process())
        note = None
        for _ in range(3):  # a concurrent takeover may race us: retry a few times
            if lock._create():
                return lock, note
            holder = lock.read_holder()
            if holder is None:  # vanished between our attempt and the read, or unreadable
                if os.path.exists(lock.path) and lock._take_over(None):
                    note = f"replaced the unreadable lock file {lock.path}"
                continue
            if holder == lock.holder:
                return lock, note
            if not (override or holder.is_gone(lock.holder)):
                raise CheckpointError(
                    f"--save {save} is in use by another job: {holder.describe()} (lock file "
                    f"{lock.path}). Two jobs saving into one directory corrupt each other's "
                    f"checkpoints: give this job another --save, or, if that job is gone "
                    f"(e.g. its node died), pass {OVERRIDE_FLAG} to take the lock over"
                )
            how = "overrode" if override and not holder.is_gone(lock.holder) else "took over"
            if lock._take_over(holder):
                note = f"{how} the --save lock of {holder.describe()} (no longer running)"
                if how == "overrode":
                    note = f"{how} the --save lock of {holder.describe()} ({OVERRIDE_FLAG})"
        if lock._create():
            return lock, note
        raise CheckpointError(f"cannot take the lock {lock.path}: another job keeps taking it")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.holder), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, expected: LockHolder | None) -> bool:
        """Move the stale lock aside (a rename: one contender wins) so that `_create` can run.

        Returns False when the file moved aside was not ``expected`` (a contender had just
        taken the lock over): that lock is put back.
        """
        aside = f"{self.path}.stale-{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # removed meanwhile: just try to create ours
        moved = _read(aside)
        os.unlink(aside)
        if expected is not None and moved is not None and moved != expected:
            with contextlib.suppress(FileExistsError):
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "w") as f:
                    json.dump(asdict(moved), f, indent=2)
            return False
        return True

    def read_holder(self) -> LockHolder | None:
        return _read(self.path)

    def check_held(self) -> None:
        """Raise unless the lock file still names this process (it may have been overridden)."""
        holder = self.read_holder()
        if holder != self.holder:
            who = holder.describe() if holder else "nobody (the lock file is gone)"
            raise CheckpointError(
                f"the lock of --save {os.path.dirname(self.path)} is now held by {who}: "
                "another job took this directory over; this job stops without publishing "
                "more checkpoints there"
            )

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if self.read_holder() == self.holder:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _read(path: str) -> LockHolder | None:
    try:
        with open(path) as f:
            return LockHolder(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None
