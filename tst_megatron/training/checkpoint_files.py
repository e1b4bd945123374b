"""The files of a checkpoint: digests taken while writing, verification, durable publication.

* `WrittenDigests` records the size and CRC32 of every shard file **as Megatron-Core's writer
  processes stream it to disk** (not re-read afterwards, when another writer may have mixed
  files in). Small files rank 0 writes itself (``common.pt``, ``.metadata``, ...) are
  digested right after they were written.
* `verify_files` checks a checkpoint against its recorded digests before a load; the ranks
  split the reading evenly by bytes (`split_by_bytes`).
* `fsync_file` / `fsync_dir` / `write_atomically` make publication durable: data, then the
  directory entry, then the rename, then the tracker.
* `describe_storage_failure` turns a failed write (ENOSPC, EROFS, a quota, or a library's
  "file write failed" that names no cause) into one line about the disk.
"""

from __future__ import annotations

import builtins
import errno
import os
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch.multiprocessing as mp
from megatron.core.dist_checkpointing.strategies import filesystem_async


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial, corrupted or incompatible with this run, or cannot
    be written."""


Digest = list[int]  # [size in bytes, CRC32]


def file_digest(path: str) -> Digest:
    """``[size, crc32]`` of a file, read in 16 MiB chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return [size, crc]


class _DigestingFile:
    """A binary file opened for writing that digests every byte written through it.

    ``torch.distributed.checkpoint`` writes each shard file strictly sequentially
    (``_write_item``: ``stream.write`` and ``stream.tell`` only), so the running CRC is the
    file's. A seek or truncate would break that: the file is then digested from disk at close.
    """

    def __init__(self, path: str, report: Callable[[str, Digest], None]) -> None:
        self._file = builtins.open(path, "wb")  # noqa: SIM115 (closed by close/__exit__)
        self._path, self._report = path, report
        self._crc, self._size, self._sequential = 0, 0, True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written = self._file.write(view)
        self._crc = zlib.crc32(view[:written], self._crc)
        self._size += written
        return written

    def seek(self, *args):
        self._sequential = False
        return self._file.seek(*args)

    def truncate(self, *args):
        self._sequential = False
        return self._file.truncate(*args)

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        digest = [self._size, self._crc] if self._sequential else file_digest(self._path)
        self._report(os.path.basename(self._path), digest)

    def __enter__(self) -> _DigestingFile:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:  # a failed write: no digest (the save fails as a whole)
            self._file.close()

    def __getattr__(self, name: str):
        return getattr(self._file, name)


def digesting_open(report: Callable[[str, Digest], None]) -> Callable:
    """An ``open`` for Megatron-Core's writer module that digests each file opened ``"wb"``
    and calls ``report(file name, digest)`` when it is closed (other modes: the builtin)."""

    def open_(path, mode="r", *args, **kwargs):
        if mode != "wb" or args or kwargs:
            return builtins.open(path, mode, *args, **kwargs)
        return _DigestingFile(os.fspath(path), report)

    return open_


class WrittenDigests:
    """Digests of the shard files Megatron-Core writes while this context is active.

    ``megatron/core/dist_checkpointing/strategies/filesystem_async.py``
    (`FileSystemWriterAsync.write_preloaded_data`) opens each shard file with the builtin
    ``open``, in writer processes forked from the rank. We give that module an ``open`` of
    its own (`digesting_open`) that digests what it writes, and the forked writers report each
    digest through a fork-inherited queue. ``--use-persistent-ckpt-worker``'s worker does the
    same in its own process (`checkpoint_worker`); its digests are `add`-ed here.
    """

    def __init__(self) -> None:
        self._queue = mp.get_context("fork").SimpleQueue()
        self._digests: dict[str, Digest] = {}

    def add(self, digests: dict[str, Digest]) -> None:
        """Digests reported elsewhere (the persistent checkpoint worker)."""
        self._digests.update(digests)

    @contextmanager
    def capturing(self) -> Iterator[WrittenDigests]:
        """Patch the writer's ``open`` for the duration (forked writers keep it)."""
        filesystem_async.open = digesting_open(lambda name, d: self._queue.put((name, d)))
        try:
            yield self
        finally:
            del filesystem_async.open

    def collect(self) -> dict[str, Digest]:
        """Every digest reported so far (call once the writers are done)."""
        while not self._queue.empty():
            name, digest = self._queue.get()
            self._digests[name] = digest
        return dict(self._digests)


def split_by_bytes(files: dict[str, Digest], parts: int) -> list[list[str]]:
    """``files`` dealt to ``parts`` readers so that their byte totals are as even as whole
    files allow (largest first, each to the least-loaded reader); the same on every rank."""
    shares: list[list[str]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for name in sorted(files, key=lambda n: (-files[n][0], n)):
        least = loads.index(min(loads))
        shares[least].append(name)
        loads[least] += files[name][0]
    return shares


def check_digests(directory: str, files: dict[str, Digest], names: list[str]) -> list[str]:
    """Problems of ``names`` (a share of ``files``) in ``directory``: missing/resized/garbled."""
    problems = []
    for name in names:
        size, crc = files[name]
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            problems.append(f"{name} is missing")
            continue
        actual_size, actual_crc = file_digest(path)
        if actual_size != size:
            how = "truncated?" if actual_size < size else "appended to?"
            problems.append(f"{name} holds {actual_size} bytes, {size} were saved ({how})")
        elif actual_crc != crc:
            problems.append(f"{name} has CRC32 {actual_crc:08x}, {crc:08x} was saved (garbled)")
    return problems


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make the directory's entries (created, renamed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, text: str) -> None:
    """Replace ``path`` by ``text``: temporary file, fsync, rename, fsync of the directory."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


_STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EIO: "an I/O error (failing disk or lost network file system)",
}


def _os_errors(err: BaseException) -> Iterator[OSError]:
    """OSErrors in ``err``'s chain, and in a ``CheckpointException``'s per-rank failures."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            yield current
        stack += [current.__cause__, current.__context__]
        for failure in getattr(current, "failures", {}).values():  # rank -> (exc, traceback)
            stack.append(failure[0] if isinstance(failure, tuple) else failure)


def short_description(err: BaseException) -> str:
    """``Type: first line`` of an error; for a ``CheckpointException`` (per-rank failures,
    each with its traceback) that of the first rank's exception."""
    failures = getattr(err, "failures", None)
    if failures:
        first = next(iter(failures.values()))
        err = first[0] if isinstance(first, tuple) else first
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(err).__name__}: {text[:300]}"


def describe_storage_failure(err: BaseException, directory: str) -> str:
    """What went wrong writing into ``directory``, in words about the disk when it is one."""
    for os_error in _os_errors(err):
        if os_error.errno in _STORAGE_ERRNOS:
            where = f" ({os_error.filename})" if os_error.filename else ""
            return f"{_STORAGE_ERRNOS[os_error.errno]}{where} [{errno.errorcode[os_error.errno]}]"
    try:  # libraries that lose the errno ("file write failed"): ask the file system
        stats = os.statvfs(directory)
    except OSError:
        stats = None
    detail = short_description(err)
    if stats is not None and stats.f_flag & os.ST_RDONLY:
        return f"the file system is read-only [EROFS] ({detail})"
    if stats is not None and stats.f_bavail * stats.f_frsize < (1 << 20):
        free = stats.f_bavail * stats.f_frsize
        return f"no space left on the device ({free} bytes free) ({detail})"
    return detail
