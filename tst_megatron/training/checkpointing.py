"""`torch_dist` checkpoints through `megatron.core.dist_checkpointing`, published atomically.

Layout (Megatron-LM's, so its tools find their way around)::

    SAVE/.tst_save.lock                         # held by the job saving here (checkpoint_lock)
    SAVE/latest_checkpointed_iteration.txt      # written last, by rename
    SAVE/iter_0000100/                          # model, optimizer, scheduler, RNG, data
    SAVE/iter_0000100/tst_checkpoint.json       # TST state, model shape, layout, digests

A save goes to ``iter_XXXXXXX.tmp``. Once every rank finished writing, rank 0 records the
size and CRC32 that each rank computed while writing its files (`checkpoint_files`), fsyncs
what it wrote and the directory, renames it to ``iter_XXXXXXX``, fsyncs the parent and then
replaces the tracker. A process killed at any moment, or a full or read-only disk, leaves the
previous checkpoint and tracker intact (a stale ``.tmp`` is removed by the next save). A load
verifies every file against the recorded digests first (torch's distributed checkpoint has
none of its own: a garbled shard would load silently).

A published checkpoint is never modified: a save of the iteration the tracker names, whose
files are all there at their recorded sizes, is skipped (`Checkpointer.save` returns None). An
``iter_XXXXXXX`` the tracker does not name (left by a publication killed before the tracker
moved) or a damaged one is renamed aside to ``iter_XXXXXXX.replaced`` only once the new copy is
complete, and removed only after the tracker moved; so are the checkpoints that
``--ckpt-keep-last`` drops. A removal that fails is a note (`Checkpointer.pop_notes`), never
a failed save.

A job's saving state (the ``--save`` lock, the async saves in flight, the saves published and
the notes since the log last asked) belongs to one `Checkpointer`, which the entry point
creates and opens before any expensive work and closes at the end.

Every failure is agreed by all ranks (one all-gather) and raised everywhere as a
`CheckpointError` with one line naming the file or directory, so no rank is left waiting.

With ``--use-torch-fsdp2`` the model's and optimizer's parameters and states are DTensors
sharded over data parallel; their sharded state dicts name each rank's local shard (Megatron-
Core's FSDP2 support in ``make_(tp_)sharded_tensor_for_checkpoint``), so the checkpoint is an
ordinary ``torch_dist`` one in model space, and a load writes straight into the shards (as
Megatron-LM's ``skip_load_to_model_and_opt``): ``load_state_dict`` is skipped, the optimizer
step restored (`optimizer.restore_steps_after_in_place_load`).

The distributed optimizer is saved ``dp_reshardable`` (each rank writes its own shard) unless
``--ckpt-fully-reshardable``; see `checkpoint_strategies`. Model weights always reshard to any
parallel layout; a ``dp_reshardable`` optimizer state only across data parallel.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from functools import partial

import torch
from megatron.core import dist_checkpointing, parallel_state
from torch.distributed.checkpoint.api import CheckpointException

from tst_megatron.config import RESUME_SETTINGS, TSTConfig
from tst_megatron.mcore_compat import (
    MCORE_VERSION,
    RANK0_CHECKPOINT_FILES,
    async_save_kwargs,
    check_checkpoint_readable,
)
from tst_megatron.settings import CheckpointConfig, ModelConfig, ParallelConfig, ScheduleConfig
from tst_megatron.settings.model import SHAPE_FIELDS
from tst_megatron.training import fault_injection
from tst_megatron.training import rng_state as rng
from tst_megatron.training.checkpoint_files import (
    CheckpointError,
    Digest,
    WrittenDigests,
    check_digests,
    describe_storage_failure,
    file_digest,
    fsync_dir,
    fsync_file,
    short_description,
    split_by_bytes,
    write_atomically,
)
from tst_megatron.training.checkpoint_lock import SaveDirLock
from tst_megatron.training.checkpoint_settings import (
    CheckpointedRun,
    check_resume_settings,
    recorded_settings,
)
from tst_megatron.training.checkpoint_strategies import (
    DP_RESHARDABLE,
    FULLY_RESHARDABLE,
    AsyncSaves,
    deferred_rank0_write_errors,
    load_strategy,
    optimizer_format,
    save_strategy,
    sharded_state_dict_metadata,
    shield_checkpoint_writer,
)
from tst_megatron.training.optimizer import (
    init_optimizer_state,
    restore_steps_after_in_place_load,
    unshare_adam_steps,
)

TRACKER = "latest_checkpointed_iteration.txt"
META = "tst_checkpoint.json"
REQUIRED_META = ("iteration", "tst", "model", "layout")
# Files Megatron-Core's torch_dist format always writes; a record without them is incomplete.
REQUIRED_FILES = RANK0_CHECKPOINT_FILES
MODEL_SHAPE_KEYS = SHAPE_FIELDS  # the record's ``model``: the model section's shape fields
# The part of the layout a dp_reshardable optimizer state is tied to (it reshards over DP).
OPTIMIZER_LAYOUT_KEYS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "expert_model_parallel_size",
    "expert_tensor_parallel_size",
)

REPLACED = ".replaced"  # suffix of a directory moved aside by a publication, then removed


@dataclass
class TrainingProgress:
    """What besides weights a checkpoint restores."""

    iteration: int
    consumed_samples: int
    phase: int
    data_state: dict
    skipped_iterations: int = 0


def iteration_dir(save: str, iteration: int) -> str:
    return os.path.join(save, f"iter_{iteration:07d}")


def model_shape(model: ModelConfig) -> dict:
    """The record's ``model``: the model's shape (`ModelConfig.shape`; a dense model has
    ``num_experts`` None and no other MoE entry)."""
    return model.shape()


def shape_differences(saved: dict, model: ModelConfig) -> list[tuple[str, object, object]]:
    """``(key, recorded, this model's)`` for each shape entry both have that differs (a dense
    model and an old record's MoE entries are not compared)."""
    shape = model_shape(model)
    return [
        (key, saved[key], shape[key])
        for key in MODEL_SHAPE_KEYS
        if key in saved and key in shape and saved[key] != shape[key]
    ]


def layout(parallel: ParallelConfig) -> dict:
    """The parallel layout a checkpoint was written at (RNG states depend on it)."""
    return {
        "tensor_model_parallel_size": parallel.tensor_model_parallel_size,
        "pipeline_model_parallel_size": parallel.pipeline_model_parallel_size,
        "virtual_pipeline_model_parallel_size": parallel.virtual_pipeline_model_parallel_size,
        "expert_model_parallel_size": parallel.expert_model_parallel_size,
        "expert_tensor_parallel_size": parallel.expert_tensor_parallel_size,
        "context_parallel_size": parallel.context_parallel_size,
        "world_size": parallel.world_size,
    }


def tst_state(tst: TSTConfig, train_iters: int, phase: int) -> dict:
    """The record's ``tst``: the TST settings and where phase 1 ends in ``train_iters``."""
    return {
        "phase": phase,
        "bag_size": tst.bag_size,
        "mode": tst.mode,
        "phase1_fraction": tst.phase1_fraction,
        "phase1_iters": tst.phase1_iters,
        "phase1_iterations": tst.phase1_iterations(train_iters),
        "train_iters": train_iters,
        **tst.resume_settings(),
    }


def _model_key(index: int, count: int) -> str:
    return "model" if count == 1 else f"model{index}"


def _sharded_state_dict(
    model_chunks, optimizer, scheduler, progress, sharding_type: str, is_loading: bool
) -> dict:
    state = {}
    for i, chunk in enumerate(model_chunks):
        state[_model_key(i, len(model_chunks))] = _unwrap(chunk).sharded_state_dict()
    if optimizer is not None:
        # the nested {model0: ..., model1: ...} dict: virtual-pipeline chunks reuse local names
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state), is_loading=is_loading, metadata=sharded_state_dict_metadata(sharding_type)
        )
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    state["progress"] = {
        "iteration": progress.iteration,
        "consumed_samples": progress.consumed_samples,
        "phase": progress.phase,
        "data_state": progress.data_state,
        "skipped_iterations": progress.skipped_iterations,
    }
    state[rng.KEY] = rng.sharded_rng_state()
    state["checkpoint_version"] = 3.0
    return state


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(value) -> list:
    """``value`` of every rank, in rank order."""
    values = [None] * _rank_and_world()[1]
    if len(values) == 1:
        return [value]
    torch.distributed.all_gather_object(values, value)
    return values


def _agree(problem: str | None) -> None:
    """Raise the first rank's problem on every rank (a collective: call it on all ranks)."""
    found = next((p for p in _gather(problem) if p), None)
    if found:
        raise CheckpointError(found)


def _on_rank0(action) -> str | None:
    """Run ``action`` on rank 0; the `CheckpointError` it raised, as a message (else None)."""
    if _rank_and_world()[0] != 0:
        return None
    try:
        action()
    except CheckpointError as err:
        return str(err)
    return None


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


@dataclass
class _PendingSave:
    """A save whose shards are written (or being written) and that waits for publication.

    ``record``: ``tst_checkpoint.json`` but its ``files``. ``lock``: the ``--save`` lock the
    publication checks it still holds (None: not taken, e.g. a conversion).
    """

    save: str
    keep_last: int
    record: dict
    iteration: int
    staging: str
    final: str
    digests: WrittenDigests
    sharding_type: str
    lock: SaveDirLock | None = None


@dataclass
class Checkpointer:
    """One job's saving to ``--save`` (Megatron-LM's ``checkpointing_context``).

    It holds the directory's lock (rank 0, from `open` to `close`), the async saves in flight,
    the async saves published since `finalize_async_saves` last returned them and the notes of
    publications (`pop_notes`). Saving without `open` works, unlocked (tests, conversions).
    """

    config: CheckpointConfig
    _lock: SaveDirLock | None = field(default=None, init=False)
    _async_saves: AsyncSaves | None = field(default=None, init=False)
    _published: list[str] = field(default_factory=list, init=False)
    _notes: list[str] = field(default_factory=list, init=False)
    _save_strategy: tuple | None = field(default=None, init=False)  # (group, parallel, strategy)

    def _strategy(self):
        """The save strategy (`checkpoint_strategies.save_strategy`), built once per
        data-parallel group and ``--ckpt-fully-parallel-save``."""
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        parallel = self.config.ckpt_fully_parallel_save
        if self._save_strategy is None or self._save_strategy[:2] != (group, parallel):
            self._save_strategy = (group, parallel, save_strategy(group, parallel))
        return self._save_strategy[2]

    def open(self) -> str | None:
        """At start-up, before any expensive work: ``--save`` is writable and this job's alone.

        Rank 0 creates the directory and takes its lock (`checkpoint_lock`), which writes and
        fsyncs a file there: a read-only, full or unwritable ``--save`` fails now, not at the
        first save. Returns a note for the log when a stale lock was taken over.

        Raises:
            CheckpointError: on every rank, naming the directory and the problem.
        """
        save = self.config.save
        if not save:
            return None
        note = []

        def take() -> None:
            try:
                os.makedirs(save, exist_ok=True)
                self._lock, taken_over = SaveDirLock.acquire(
                    save, override=self.config.override_save_lock
                )
            except OSError as err:
                raise CheckpointError(
                    f"--save {save} is not writable: {describe_storage_failure(err, save)}"
                ) from None
            if taken_over:
                note.append(taken_over)

        _agree(_on_rank0(take))
        return note[0] if note else None

    def close(self) -> None:
        """Stop the persistent checkpoint worker (`AsyncSaves.close`) and release the
        ``--save`` lock (rank 0; a no-op elsewhere). Safe to call twice."""
        if self._async_saves is not None:
            self._async_saves.close()
            self._async_saves = None
        if self._lock is not None:
            with contextlib.suppress(OSError):  # a read-only or vanished directory
                self._lock.release()
            self._lock = None

    def save(
        self,
        run: CheckpointedRun,
        model_chunks: list,
        optimizer,
        scheduler,
        progress: TrainingProgress,
        async_save: bool = False,
    ) -> str | None:
        """Write ``SAVE/iter_XXXXXXX`` of ``run`` and publish it (point the tracker at it).

        With ``async_save`` the shards are written by a background process and the checkpoint
        is published by `finalize_async_saves` once every rank is done; earlier pending saves
        are finalized first. Returns the checkpoint's path.

        Returns None, saving nothing, when ``--save``'s tracker already names this iteration
        and its checkpoint is intact (`published_intact`): a published checkpoint is never
        rewritten.

        Raises:
            CheckpointError: on every rank; the previous checkpoint and the tracker are intact.
        """
        save = self.config.save
        assert save, "Checkpointer.save needs --save"
        if self._async_saves is not None:  # one save in flight at a time; logged at finalize
            self._async_saves.finalize(blocking=True)
        final = iteration_dir(save, progress.iteration)
        if _gather(_rank_and_world()[0] == 0 and published_intact(save, progress.iteration))[0]:
            return None
        sharding_type = optimizer_format(self.config.ckpt_fully_reshardable)
        pending = _PendingSave(
            save=save,
            keep_last=self.config.ckpt_keep_last,
            record=checkpoint_record(run, progress, sharding_type),
            iteration=progress.iteration,
            staging=final + ".tmp",
            final=final,
            digests=WrittenDigests(),
            sharding_type=sharding_type,
            lock=self._lock,
        )

        def prepare() -> None:
            if self._lock is not None:
                self._lock.check_held()
            try:
                os.makedirs(save, exist_ok=True)
                shutil.rmtree(pending.staging, ignore_errors=True)
                os.makedirs(pending.staging)
            except OSError as err:
                reason = describe_storage_failure(err, save)
                raise CheckpointError(_save_failure(pending, reason)) from None

        _agree(_on_rank0(prepare))
        shield_checkpoint_writer()
        state = _sharded_state_dict(
            model_chunks, optimizer, scheduler, progress, pending.sharding_type, False
        )
        request, failure = None, None
        with deferred_rank0_write_errors() as deferred, pending.digests.capturing():
            try:
                request = dist_checkpointing.save(
                    state,
                    pending.staging,
                    self._strategy(),
                    async_sharded_save=async_save,
                    content_metadata=sharded_state_dict_metadata(pending.sharding_type),
                    **async_save_kwargs(),
                )
            except (Exception, CheckpointException) as err:  # CheckpointException: BaseException
                failure = err
            if deferred and failure is None:
                failure = deferred[0]
            if request is not None and failure is None:
                self._schedule(request, pending)
                return final
        self._notes.extend(_publish(pending, failure))
        return final

    def _schedule(self, request, pending: _PendingSave) -> None:
        """Queue an async save: its finalize functions and our publication run once all ranks'
        writes are done, inside `deferred_rank0_write_errors`."""
        mcore_finalize = list(request.finalize_fns)
        request.finalize_fns.clear()
        request.finalize_fns.append(partial(self._finalize_and_publish, mcore_finalize, pending))
        if self._async_saves is None:
            self._async_saves = AsyncSaves()
        self._async_saves.schedule(request)

    def _finalize_and_publish(self, mcore_finalize: list, pending: _PendingSave) -> None:
        assert self._async_saves is not None
        pending.digests.add(self._async_saves.written_digests())  # this rank's writes are done
        failure = None
        with deferred_rank0_write_errors() as deferred:
            try:
                for finalize in mcore_finalize:
                    finalize()
            except (Exception, CheckpointException) as err:
                failure = err
            if deferred and failure is None:
                failure = deferred[0]
        self._notes.extend(_publish(pending, failure))
        self._published.append(pending.final)

    def finalize_async_saves(self, blocking: bool) -> list[str]:
        """Publish the async saves that every rank finished writing (all of them when
        ``blocking``); returns their paths. Call on all ranks, e.g. once per step."""
        if self._async_saves is None:
            return []
        self._async_saves.finalize(blocking)
        done = list(self._published)
        self._published.clear()
        return done

    def pop_notes(self) -> list[str]:
        """Notes of the publications since the last call (old directories that stayed)."""
        notes = list(self._notes)
        self._notes.clear()
        return notes


def checkpoint_record(run: CheckpointedRun, progress: TrainingProgress, sharding_type: str) -> dict:
    """``tst_checkpoint.json`` of ``run`` at ``progress``, but the file digests."""
    return {
        "iteration": progress.iteration,
        "megatron_core": MCORE_VERSION,
        "tst": tst_state(run.tst, run.schedule.train_iters, progress.phase),
        "model": model_shape(run.model),
        "layout": layout(run.parallel),
        "use_distributed_optimizer": run.parallel.use_distributed_optimizer,
        "optimizer_format": sharding_type,
        "overlap_grad_reduce": run.parallel.overlap_grad_reduce,
        "consumed_data_tokens": progress.data_state.get("consumed_tokens", 0),
        "settings": recorded_settings(run),
    }


def _previous_checkpoint(save: str) -> str:
    """What a failed save left intact, for its message."""
    try:
        with open(os.path.join(save, TRACKER)) as f:
            text = f.read().strip()
    except OSError:
        return f"no checkpoint was published in {save} before (nothing is lost)"
    if not text.isdigit():
        return f"{TRACKER} is unchanged"
    previous = iteration_dir(save, int(text))
    if not os.path.isfile(os.path.join(previous, META)):
        return f"{TRACKER} is unchanged (it names {previous}, which holds no {META})"
    return f"the previous checkpoint {previous} and {TRACKER} are unchanged"


def published_intact(save: str, iteration: int) -> bool:
    """Whether ``save``'s tracker names ``iteration`` and its directory holds every recorded
    file at its recorded size (a cheap check: the load verifies the CRC32s)."""
    try:
        with open(os.path.join(save, TRACKER)) as f:
            if f.read().strip() != str(iteration):
                return False
        path = iteration_dir(save, iteration)
        files = recorded_files(read_checkpoint_meta(path), path)
        return all(os.path.getsize(os.path.join(path, n)) == d[0] for n, d in files.items())
    except (OSError, CheckpointError):
        return False


def _save_failure(pending: _PendingSave, reason: str) -> str:
    return (
        f"cannot save the checkpoint of iteration {pending.iteration} to {pending.staging}: "
        f"{reason}; {_previous_checkpoint(pending.save)}. Free space or fix --save "
        f"{pending.save} (or give another --save) and resume from the previous checkpoint"
    )


def _publish(pending: _PendingSave, failure: BaseException | None) -> list[str]:
    """All ranks: agree that every write succeeded, then rank 0 publishes (see module doc).

    Returns rank 0's notes of old directories it could not remove (on every rank).
    """
    written = pending.digests.collect()
    problem = None
    if failure is not None:
        problem = _save_failure(pending, describe_storage_failure(failure, pending.staging))
    parts = _gather((written, problem))
    problem = next((p for _, p in parts if p), None)
    cleanup: list[str] = []
    if problem is None:
        fault_injection.during_save(pending.iteration, pending.staging)
        files = {name: digest for part, _ in parts for name, digest in part.items()}
        problem = _on_rank0(partial(_publish_on_rank0, pending, files, cleanup))
    if problem is not None and _rank_and_world()[0] == 0:
        shutil.rmtree(pending.staging, ignore_errors=True)  # free the space it took
    _agree(problem)
    return _gather(cleanup)[0]


def _publish_on_rank0(pending: _PendingSave, files: dict[str, Digest], notes: list) -> None:
    """Record, move in beside the published checkpoint, move the tracker, then clean up."""
    staging, final = pending.staging, pending.final
    aside = final + REPLACED
    try:
        present = set(os.listdir(staging))
        for name in sorted(present - set(files)):
            if name in REQUIRED_FILES:  # written by rank 0 itself: digest it now, then fsync
                files[name] = file_digest(os.path.join(staging, name))
                fsync_file(os.path.join(staging, name))
        unexpected = sorted(present - set(files))
        missing = sorted(set(files) - present)
        if unexpected or missing:
            raise CheckpointError(
                f"cannot publish {staging}: it holds {unexpected or 'no'} files that no rank of "
                f"this job wrote and lacks {missing or 'none'} that were written: another job "
                f"is writing to --save {pending.save} (each --save must have one writer)"
            )
        if pending.lock is not None:
            pending.lock.check_held()
        meta = {**pending.record, "files": dict(sorted(files.items()))}
        write_atomically(os.path.join(staging, META), json.dumps(meta, indent=2))
        fsync_dir(staging)
        fault_injection.publishing(pending.iteration, "recorded")
        if os.path.lexists(final):  # not the tracker's, or damaged: kept until the tracker moved
            _remove(aside, notes)
            os.replace(final, aside)
            fault_injection.publishing(pending.iteration, "moved_aside")
        os.replace(staging, final)
        fsync_dir(pending.save)
        fault_injection.publishing(pending.iteration, "renamed")
        write_atomically(os.path.join(pending.save, TRACKER), str(pending.iteration))
        fault_injection.publishing(pending.iteration, "tracked")
    except OSError as err:
        raise CheckpointError(
            _save_failure(pending, describe_storage_failure(err, staging))
        ) from None
    if os.path.lexists(aside):
        _remove(aside, notes)
    _rotate(pending.save, pending.keep_last, pending.iteration, notes)


def _remove(path: str, notes: list[str]) -> None:
    """Delete a directory no tracker names; what cannot be deleted stays, with a note."""
    if not os.path.lexists(path):
        return
    failures: list[str] = []

    def failed(function, name: str, exc) -> None:  # exc: the exception (3.12) or exc_info
        failures.append(f"{name}: {exc[1] if isinstance(exc, tuple) else exc}")

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=failed)
    else:
        shutil.rmtree(path, onerror=failed)
    if failures:
        notes.append(
            f"could not remove {path} after publishing ({failures[0]}); the published "
            "checkpoint is complete: remove it by hand"
        )


def _rotate(save: str, keep_last: int, newest: int, notes: list[str]) -> None:
    if keep_last <= 0:
        return
    iterations = sorted(saved_iterations(save))
    for iteration in iterations[:-keep_last]:
        if iteration != newest:
            _remove(iteration_dir(save, iteration), notes)


def saved_iterations(save: str) -> list[int]:
    found = []
    for name in os.listdir(save) if os.path.isdir(save) else []:
        if name.startswith("iter_") and name[5:].isdigit():
            found.append(int(name[5:]))
    return found


# --------------------------------------------------------------------------------------------
# Finding, checking and loading
# --------------------------------------------------------------------------------------------


def find_checkpoint(load: str) -> str | None:
    """The published checkpoint ``--load`` points at (a save dir or an ``iter_`` dir)."""
    if os.path.isfile(os.path.join(load, META)):
        return load
    tracker = os.path.join(load, TRACKER)
    if not os.path.isfile(tracker):
        return None
    try:
        with open(tracker) as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {tracker}: {err}") from None
    if not text.isdigit():
        raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number")
    path = iteration_dir(load, int(text))
    if not os.path.isfile(os.path.join(path, META)):
        raise CheckpointError(
            f"{tracker} points at iteration {text} but {path} is missing or incomplete "
            f"(no {META}); the checkpoint was not published"
        )
    return path


def read_checkpoint_meta(path: str) -> dict:
    """``tst_checkpoint.json`` of a checkpoint, checked for the entries a load relies on and
    for the Megatron-Core version that wrote it (``megatron_core``; absent: 0.16.1).

    Raises:
        CheckpointError: unreadable, not JSON (truncated), an entry missing, naming the file;
            or written by a Megatron-Core this one cannot read, naming both versions.
    """
    file = os.path.join(path, META)
    try:
        with open(file) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {file}: {err}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{file} is not valid JSON ({err}; truncated or overwritten?): the checkpoint's "
            "record is damaged; load an earlier checkpoint (point --load at its iter_ directory)"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file} holds {type(meta).__name__}, not the checkpoint record")
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise CheckpointError(f"{file} lacks {', '.join(missing)}: it is no checkpoint record")
    problems = _record_problems(meta)
    if problems:
        raise CheckpointError(
            f"{file} is damaged: {'; '.join(problems)}; load an earlier checkpoint (point "
            "--load at its iter_XXXXXXX directory)"
        )
    try:
        check_checkpoint_readable(meta.get("megatron_core"), path)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    return meta


def _record_problems(meta: dict) -> list[str]:
    """What in a checkpoint record does not have the type a load relies on."""
    problems = []
    iteration = meta["iteration"]
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        problems.append(f"iteration is {iteration!r}, not a count of iterations")
    for key in ("tst", "model", "layout"):
        if not isinstance(meta[key], dict):
            problems.append(f"{key} is {meta[key]!r}, not a mapping")
    tst = meta["tst"] if isinstance(meta["tst"], dict) else {}
    if "tst" not in [p.partition(" ")[0] for p in problems]:
        if tst.get("phase") not in (1, 2):
            what = repr(tst["phase"]) if "phase" in tst else "missing"
            problems.append(f"tst.phase is {what}, not 1 or 2")
        for key, kind in (("bag_size", int), ("mode", str)):
            if not isinstance(tst.get(key), kind):
                what = repr(tst[key]) if key in tst else "missing"
                problems.append(f"tst.{key} is {what}")
    return problems


def check_load_early(load: str | None) -> None:
    """Before the model is built: the record of ``--load``'s checkpoint (if there is one) is
    readable and was written by a Megatron-Core this one can read (`read_checkpoint_meta`).

    Raises:
        CheckpointError: as `find_checkpoint` and `read_checkpoint_meta` do.
    """
    path = find_checkpoint(load) if load else None
    if path is not None:
        read_checkpoint_meta(path)


def recorded_files(meta: dict, path: str) -> dict[str, Digest]:
    """The file digests a checkpoint's record holds; a load never goes on without them.

    Raises:
        CheckpointError: the ``files`` entry, or one of Megatron-Core's files in it, is missing.
    """
    files = meta.get("files")
    if not isinstance(files, dict):
        files, missing = {}, ["files"]
    else:
        missing = [f"files[{name!r}]" for name in REQUIRED_FILES if name not in files]
    if missing:
        raise CheckpointError(
            f"cannot load checkpoint {path}: {os.path.join(path, META)} lacks "
            f"{', '.join(missing)}: without the recorded file digests the checkpoint cannot be "
            "verified (a damaged shard would load silently); load an earlier checkpoint"
        )
    return files


def verify_files(path: str, files: dict[str, Digest]) -> None:
    """Check every file's size and CRC32 against those recorded at save.

    The ranks split the reading evenly by bytes. Works without a process group (one reader).

    Raises:
        CheckpointError: on every rank, naming each missing, resized or altered file.
    """
    rank, world = _rank_and_world()
    share = split_by_bytes(files, world)[rank]
    problems = [p for part in _gather(check_digests(path, files, share)) for p in part]
    if problems:
        raise CheckpointError(
            f"checkpoint {path} is corrupted: " + "; ".join(sorted(problems)) + ": load an "
            "earlier checkpoint (point --load at its iter_XXXXXXX directory)"
        )


def check_compatible(
    run: CheckpointedRun,
    checkpoint: CheckpointConfig,
    meta: dict,
    path: str,
    evaluation_only: bool = False,
) -> list[str]:
    """Reject a resume of ``run`` whose model shape or phase-1 TST settings (bag size, mode,
    fold, bag-loss weighting) differ from the checkpoint.

    Every difference is named in one message, with the checkpoint's value and this run's.
    Also checks the recorded settings (`check_resume_settings`), the schedule
    (`check_schedule`; not with ``evaluation_only``, as `tools/evaluate.py` loads the weights
    alone) and the optimizer format against the layout. Returns notes for the log (the
    changes the flags allowed).
    """
    diffs = [
        f"{key}: checkpoint {saved!r}, this run {now!r}"
        for key, saved, now in shape_differences(meta["model"], run.model)
    ]
    saved_tst, tst = meta["tst"], run.tst
    if saved_tst["phase"] == 1 and run.schedule.tst_phase != "2" and not checkpoint.finetune:
        diffs += [
            f"{flag}: checkpoint {saved_tst[key]!r}, this run {getattr(tst, key)!r}"
            for key, flag in (("bag_size", "--tst-bag-size"), ("mode", "--tst-mode"))
            if saved_tst[key] != getattr(tst, key)
        ]
        current = tst.resume_settings()  # fold, bag-loss weighting (issue 13)
        diffs += [
            f"{flag}: checkpoint {saved_tst.get(key, default)!r}, this run {current[key]!r}"
            for key, (flag, default) in RESUME_SETTINGS.items()
            if saved_tst.get(key, default) != current[key]
        ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} does not match this run (resume with its model shape and, "
            "for a phase-1 checkpoint, its TST settings): " + "; ".join(diffs)
        )
    notes = check_resume_settings(run, checkpoint, meta, path, evaluation_only)
    saved_dist_opt = meta.get("use_distributed_optimizer")
    loads_optimizer = not (checkpoint.no_load_optim or checkpoint.finetune)
    if loads_optimizer and saved_dist_opt != run.parallel.use_distributed_optimizer:
        flag = "with" if saved_dist_opt else "without"
        raise CheckpointError(
            f"checkpoint {path} was saved {flag} --use-distributed-optimizer; the optimizer "
            "state formats differ: resume with the same setting, or pass --no-load-optim"
        )
    if loads_optimizer and saved_dist_opt:
        _check_optimizer_layout(run.parallel, meta, path)
    if evaluation_only:  # tools/evaluate.py: weights only, no schedule
        return notes
    return notes + check_schedule(run, checkpoint, meta, path)


def _check_optimizer_layout(parallel: ParallelConfig, meta: dict, path: str) -> None:
    """A dp_reshardable optimizer state loads only at its model-parallel layout."""
    if meta.get("optimizer_format", FULLY_RESHARDABLE) != DP_RESHARDABLE:
        return
    saved, now = meta["layout"], layout(parallel)
    diffs = [
        f"{key}: checkpoint {saved.get(key)!r}, this run {now[key]!r}"
        for key in OPTIMIZER_LAYOUT_KEYS
        if saved.get(key) != now[key]
    ]
    if bool(meta.get("overlap_grad_reduce")) != parallel.overlap_grad_reduce:
        diffs.append(
            f"--overlap-grad-reduce: checkpoint {bool(meta.get('overlap_grad_reduce'))}, this "
            f"run {parallel.overlap_grad_reduce} (it sets the buckets)"
        )
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} holds its distributed-optimizer state in the dp_reshardable "
            "format, which reshards across data parallel only, and this run's layout differs: "
            + "; ".join(diffs)
            + ". Either resume once at the checkpoint's layout with --ckpt-fully-reshardable "
            "(e.g. with --exit-interval) to write a reshardable checkpoint, or pass "
            "--no-load-optim (the weights reshard; the optimizer restarts)"
        )


def check_schedule(
    run: CheckpointedRun, checkpoint: CheckpointConfig, meta: dict, path: str
) -> list[str]:
    """Refuse a resume that would change the TST phase schedule or the LR schedule silently.

    Returns notes for the log when ``--tst-allow-schedule-change`` allowed a change.
    """
    if checkpoint.finetune:
        return []
    tst, tst_phase, train_iters = run.tst, run.schedule.tst_phase, run.schedule.train_iters
    saved = meta["tst"]
    iteration = int(meta["iteration"])
    saved_phase, saved_p1 = saved["phase"], saved.get("phase1_iterations")
    now_p1 = tst.phase1_iterations(train_iters)
    allow = checkpoint.tst_allow_schedule_change
    schedule_flags = (
        f"--tst-phase1-fraction {tst.phase1_fraction}"
        if tst.phase1_fraction is not None
        else f"--tst-phase1-iters {tst.phase1_iters}"
    )
    saved_flags = (
        f"--tst-phase1-fraction {saved.get('phase1_fraction')}"
        if saved.get("phase1_fraction") is not None
        else f"--tst-phase1-iters {saved.get('phase1_iters')}"
    )
    notes = []
    if tst_phase == "2" and saved["bag_size"] == 1:
        raise CheckpointError(
            f"--tst-phase 2 continues a TST phase-1 run, but checkpoint {path} was saved by a "
            "baseline run (--tst-bag-size 1, no phase 1): drop --tst-phase 2 and the --tst-* "
            "flags to continue the baseline, or --load the phase-1 checkpoint"
        )
    if tst_phase == "2" and saved_phase == 1 and saved_p1 is not None and iteration < saved_p1:
        if not allow:
            raise CheckpointError(
                f"checkpoint {path} is at iteration {iteration}, inside phase 1 (which ends at "
                f"iteration {saved_p1}): finish phase 1 first (--tst-phase 1), or pass "
                "--tst-allow-schedule-change to start phase 2 now"
            )
        notes.append(f"phase 1 cut short at iteration {iteration} (it was to end at {saved_p1})")
    if tst_phase == "1" and saved_phase == 2:
        raise CheckpointError(
            f"checkpoint {path} is already in phase 2 (iteration {iteration}): --tst-phase 1 "
            "has nothing left to do; continue with --tst-phase 2"
        )
    if tst_phase != "2" and saved_p1 is not None and now_p1 != saved_p1:
        what = (
            f"this run's phase 1 ends at iteration {now_p1} ({schedule_flags}, --train-iters "
            f"{train_iters}); the checkpoint's ended at {saved_p1} ({saved_flags}, "
            f"--train-iters {saved.get('train_iters')})"
        )
        if saved_phase == 2 and now_p1 > iteration:
            raise CheckpointError(
                f"checkpoint {path} is at iteration {iteration}, in phase 2, but {what}: "
                "resuming would go back to bag (phase-1) training. Resume with the checkpoint's "
                "phase-1 length and --train-iters"
            )
        if saved_phase == 1:
            if not allow:
                raise CheckpointError(
                    f"checkpoint {path} is at iteration {iteration}, in phase 1, and {what}: "
                    "resume with the checkpoint's phase-1 length and --train-iters, or pass "
                    "--tst-allow-schedule-change to move the boundary"
                )
            when = "now" if now_p1 <= iteration else f"at iteration {now_p1}"
            notes.append(
                f"TST schedule changed (--tst-allow-schedule-change): phase 1 ends {when} "
                f"instead of at iteration {saved_p1}"
            )
    saved_t = saved.get("train_iters")
    if saved_t is not None and saved_t != train_iters and not checkpoint.no_load_optim:
        if checkpoint.use_checkpoint_opt_param_scheduler:
            notes.append(
                f"--train-iters {train_iters} (checkpoint: {saved_t}): the learning-rate "
                "and weight-decay schedules continue as the checkpoint's "
                "(--use-checkpoint-opt_param-scheduler)"
            )
        elif not checkpoint.override_opt_param_scheduler:
            raise CheckpointError(
                f"--train-iters {train_iters} differs from checkpoint {path}'s "
                f"{saved_t}: the learning-rate and weight-decay schedules were built for "
                f"{saved_t} iterations. Resume with --train-iters {saved_t}, or pass "
                "--override-opt_param-scheduler to continue with this run's schedules or "
                "--use-checkpoint-opt_param-scheduler to continue with the checkpoint's"
            )
        else:
            notes.append(
                f"--train-iters {train_iters} (checkpoint: {saved_t}): the learning-rate "
                "and weight-decay schedules follow this run's flags "
                "(--override-opt_param-scheduler)"
            )
    return notes


def _match_saved_learning_rates(schedule: ScheduleConfig, optimizer, meta: dict) -> None:
    """Give this run's param groups the recorded ``--lr`` / ``--min-lr`` before a load.

    Megatron-Core 0.19 pairs saved and current param groups by a key that includes
    ``max_lr`` and ``min_lr`` (``param_group_identifier_keys``), so a resume whose schedule
    flags differ (allowed by ``--override-opt_param-scheduler`` or
    ``--use-checkpoint-opt_param-scheduler``) would find no group; 0.16 pairs them by position
    and restores the saved values anyway. The load then restores the checkpoint's values, and
    ``--override-opt_param-scheduler`` puts this run's back (`load_checkpoint`).
    """
    saved = (meta.get("settings") or {}).get("schedule") or {}
    for key, dest in (("max_lr", "lr"), ("min_lr", "min_lr")):
        now, then = getattr(schedule, dest), saved.get(dest)
        if then is None or now is None or then == now:
            continue
        for group in optimizer.param_groups:
            if group.get(key) == now:
                group[key] = then


def load_checkpoint(
    run: CheckpointedRun,
    checkpoint: CheckpointConfig,
    model_chunks: list,
    optimizer,
    scheduler,
    path: str,
    load_rng: bool = True,
) -> TrainingProgress:
    """Load model (+ optimizer, scheduler, RNG unless disabled) from a published checkpoint
    into the chunks of ``run``, as ``checkpoint``'s ``--no-load-*`` / ``--finetune`` /
    ``--override-opt_param-scheduler`` ask.

    RNG states are per rank of the layout they were saved at: pass ``load_rng=False`` when the
    layout changed.

    Raises:
        CheckpointError: on every rank, naming the checkpoint and what failed.
    """
    meta = read_checkpoint_meta(path)
    load_optim = optimizer is not None and not checkpoint.no_load_optim and not checkpoint.finetune
    if load_optim:
        init_optimizer_state(optimizer)
        if checkpoint.override_opt_param_scheduler:
            scheduler.override_opt_param_scheduler = True
    sharding_type = meta.get("optimizer_format", FULLY_RESHARDABLE)
    state = _sharded_state_dict(
        model_chunks,
        optimizer if load_optim else None,
        scheduler if load_optim else None,
        TrainingProgress(0, 0, 1, {}),
        sharding_type,
        True,
    )
    if checkpoint.no_load_rng or checkpoint.finetune or not load_rng:
        state.pop(rng.KEY)
    verify_files(path, recorded_files(meta, path))
    try:
        loaded = dist_checkpointing.load(
            state, path, load_strategy(path, checkpoint.ckpt_fully_parallel_load)
        )
        in_place = run.parallel.use_torch_fsdp2  # see the module doc
        for i, chunk in enumerate(model_chunks):
            if not in_place:
                key = _model_key(i, len(model_chunks))
                _unwrap(chunk).load_state_dict(loaded[key], strict=True)
        if load_optim:
            this_run = [(g.get("max_lr"), g.get("min_lr")) for g in optimizer.param_groups]
            _match_saved_learning_rates(run.schedule, optimizer, meta)
            if in_place:
                restore_steps_after_in_place_load(optimizer, loaded["optimizer"])
            else:
                optimizer.load_state_dict(loaded["optimizer"])
                unshare_adam_steps(optimizer)
            if checkpoint.override_opt_param_scheduler:
                # the scheduler reads each group's max_lr / min_lr, which the load restored
                for group, (max_lr, min_lr) in zip(optimizer.param_groups, this_run, strict=True):
                    group.update({k: v for k, v in (("max_lr", max_lr), ("min_lr", min_lr))
                                  if v is not None})  # fmt: skip
            scheduler.load_state_dict(loaded["opt_param_scheduler"])
        if rng.KEY in loaded:
            rng.restore_rng_state(loaded[rng.KEY])
    except (Exception, CheckpointException) as err:  # CheckpointException: BaseException
        raise CheckpointError(describe_load_failure(err, path)) from None
    progress = loaded["progress"]
    if checkpoint.finetune:
        return TrainingProgress(0, 0, 2, {})
    return TrainingProgress(
        iteration=int(progress["iteration"]),
        consumed_samples=int(progress["consumed_samples"]),
        phase=int(progress["phase"]),
        data_state=progress["data_state"],
        skipped_iterations=int(progress.get("skipped_iterations", 0)),
    )


def describe_load_failure(err: BaseException, path: str) -> str:
    """One line for a failed `dist_checkpointing.load` of ``path``."""
    detail = short_description(err)
    if "Number of unpadded elements in each bucket" in detail:
        detail += (
            " (the distributed optimizer's buckets differ from the checkpoint's: they depend "
            "on --overlap-grad-reduce and, for large models, the data-parallel size; resume "
            "with the saving run's settings, or save with --ckpt-fully-reshardable)"
        )
    return f"cannot load checkpoint {path}: {detail}"
