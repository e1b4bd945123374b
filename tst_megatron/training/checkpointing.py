"""`torch_dist` checkpoints through `megatron.core.dist_checkpointing`, published atomically.

Layout (Megatron-LM's, so its tools find their way around)::

    SAVE/latest_checkpointed_iteration.txt      # written last, by rename
    SAVE/iter_0000100/                          # model, optimizer, scheduler, RNG, data
    SAVE/iter_0000100/tst_checkpoint.json       # TST state + model shape, for checks

A save goes to ``iter_XXXXXXX.tmp``; after every rank finished writing, rank 0 renames it
to ``iter_XXXXXXX`` and then replaces the tracker file. A process killed at any moment
leaves the previous checkpoint and tracker intact (a stale ``.tmp`` is removed by the next
save). ``tst_checkpoint.json`` records the size and CRC32 of every file of the checkpoint
(torch's distributed checkpoint has no checksums: a garbled shard would load silently); a
load verifies them first. A checkpoint saved at one parallel layout loads at another
(resharding).
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from argparse import Namespace
from dataclasses import dataclass

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from tst_megatron.training import fault_injection
from tst_megatron.training.checkpoint_strategies import shield_checkpoint_writer
from tst_megatron.training.optimizer import init_optimizer_state, unshare_adam_steps

TRACKER = "latest_checkpointed_iteration.txt"
META = "tst_checkpoint.json"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
MODEL_SHAPE_KEYS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "padded_vocab_size",
    "num_experts",
    "moe_ffn_hidden_size",
    "moe_router_topk",
    "swiglu",
    "normalization",
    "position_embedding_type",
    "untie_embeddings_and_output_weights",
    "add_bias_linear",
    "qk_layernorm",
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial, corrupted or incompatible with this run."""


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


def model_shape(args: Namespace) -> dict:
    return {key: getattr(args, key, None) for key in MODEL_SHAPE_KEYS}


def layout(args: Namespace) -> dict:
    """The parallel layout a checkpoint was written at (RNG states depend on it)."""
    return {
        "tensor_model_parallel_size": args.tensor_model_parallel_size,
        "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
        "world_size": torch.distributed.get_world_size(),
    }


def tst_state(args: Namespace, phase: int) -> dict:
    return {
        "phase": phase,
        "bag_size": args.tst.bag_size,
        "mode": args.tst.mode,
        "phase1_fraction": args.tst.phase1_fraction,
        "phase1_iters": args.tst.phase1_iters,
    }


def _sharded_state_dict(model_chunks, optimizer, scheduler, progress, args, is_loading):
    state = {}
    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        state[key] = _unwrap(chunk).sharded_state_dict()
    if optimizer is not None:
        # the nested {model0: ..., model1: ...} dict: virtual-pipeline chunks reuse local names
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state), is_loading=is_loading, metadata=OPTIMIZER_METADATA
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
    state["rng_state"] = _rng_sharded_object()
    state["checkpoint_version"] = 3.0
    return state


def _rng_sharded_object() -> ShardedObject:
    """Per-(pp, tp) RNG state, replicated over data parallel, as Megatron-LM stores it."""
    from megatron.core import tensor_parallel

    rng = {
        "random_rng_state": __import__("random").getstate(),
        "np_rng_state": __import__("numpy").random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    return ShardedObject(
        "rng_state",
        [rng],
        (pp_size, tp_size),
        (pp_rank, tp_rank),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def save_checkpoint(args, model_chunks, optimizer, scheduler, progress: TrainingProgress) -> str:
    """Write ``SAVE/iter_XXXXXXX`` atomically and point the tracker at it."""
    final = iteration_dir(args.save, progress.iteration)
    staging = final + ".tmp"
    rank = torch.distributed.get_rank()
    if rank == 0:
        os.makedirs(args.save, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    torch.distributed.barrier()
    shield_checkpoint_writer()
    state = _sharded_state_dict(model_chunks, optimizer, scheduler, progress, args, False)
    dist_checkpointing.save(state, staging)
    fault_injection.during_save(progress.iteration)
    torch.distributed.barrier()
    names = [sorted(os.listdir(staging)) if rank == 0 else None]
    torch.distributed.broadcast_object_list(names, src=0)
    digests = _gather(_digest_share(staging, names[0]))
    if rank == 0:
        meta = {
            "iteration": progress.iteration,
            "tst": tst_state(args, progress.phase),
            "model": model_shape(args),
            "layout": layout(args),
            "use_distributed_optimizer": bool(args.use_distributed_optimizer),
            "consumed_data_tokens": progress.data_state.get("consumed_tokens", 0),
            "files": {name: digest for part in digests for name, digest in part.items()},
        }
        _write_atomically(os.path.join(staging, META), json.dumps(meta, indent=2))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(staging, final)
        _write_atomically(os.path.join(args.save, TRACKER), str(progress.iteration))
        _rotate(args.save, getattr(args, "ckpt_keep_last", 0) or 0, progress.iteration)
    torch.distributed.barrier()
    return final


def _file_digest(path: str) -> list[int]:
    """``[size, crc32]`` of a file."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return [os.path.getsize(path), crc]


def _digest_share(directory: str, names: list[str]) -> dict[str, list[int]]:
    """Digests of this rank's share of ``names`` (ranks split the reading)."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return {name: _file_digest(os.path.join(directory, name)) for name in names[rank::world]}


def _gather(value) -> list:
    """``value`` of every rank, in rank order."""
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def verify_files(path: str, files: dict[str, list[int]]) -> None:
    """Check every file's size and CRC32 against those recorded at save (ranks share the work).

    Raises:
        CheckpointError: on every rank, naming each missing, resized or altered file.
    """
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    problems = []
    for name in sorted(files)[rank::world]:
        size, crc = files[name]
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            problems.append(f"{name} is missing")
            continue
        actual_size, actual_crc = _file_digest(file)
        if actual_size != size:
            problems.append(f"{name} holds {actual_size} bytes, {size} were saved (truncated?)")
        elif actual_crc != crc:
            problems.append(f"{name} has CRC32 {actual_crc:08x}, {crc:08x} was saved (garbled)")
    problems = [problem for part in _gather(problems) for problem in part]
    if problems:
        raise CheckpointError(
            f"checkpoint {path} is corrupted: " + "; ".join(problems) + ": load an earlier "
            "checkpoint (point --load at its iter_XXXXXXX directory)"
        )


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rotate(save: str, keep_last: int, newest: int) -> None:
    if keep_last <= 0:
        return
    iterations = sorted(saved_iterations(save))
    for iteration in iterations[:-keep_last]:
        if iteration != newest:
            shutil.rmtree(iteration_dir(save, iteration), ignore_errors=True)


def saved_iterations(save: str) -> list[int]:
    found = []
    for name in os.listdir(save) if os.path.isdir(save) else []:
        if name.startswith("iter_") and not name.endswith(".tmp") and name[5:].isdigit():
            found.append(int(name[5:]))
    return found


def find_checkpoint(load: str) -> str | None:
    """The published checkpoint ``--load`` points at (a save dir or an ``iter_`` dir)."""
    if os.path.isfile(os.path.join(load, META)):
        return load
    tracker = os.path.join(load, TRACKER)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        text = f.read().strip()
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
    with open(os.path.join(path, META)) as f:
        return json.load(f)


def check_compatible(args: Namespace, meta: dict, path: str) -> None:
    """Reject a resume whose model shape or phase-1 TST bag size/mode differs from the checkpoint.

    Every difference is named in one message, with the checkpoint's value and this run's.
    """
    saved_shape, shape = meta["model"], model_shape(args)
    diffs = [
        f"{key}: checkpoint {saved_shape.get(key)!r}, this run {shape[key]!r}"
        for key in MODEL_SHAPE_KEYS
        if key in saved_shape and saved_shape.get(key) != shape[key]
    ]
    saved_tst = meta["tst"]
    if saved_tst["phase"] == 1 and args.tst_phase != "2" and not args.finetune:
        diffs += [
            f"{flag}: checkpoint {saved_tst[key]!r}, this run {getattr(args.tst, key)!r}"
            for key, flag in (("bag_size", "--tst-bag-size"), ("mode", "--tst-mode"))
            if saved_tst[key] != getattr(args.tst, key)
        ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} does not match this run (resume with its model shape and, "
            "for a phase-1 checkpoint, its TST settings): " + "; ".join(diffs)
        )
    saved_dist_opt = meta.get("use_distributed_optimizer")
    loads_optimizer = not (args.no_load_optim or args.finetune)
    if loads_optimizer and saved_dist_opt != bool(args.use_distributed_optimizer):
        flag = "with" if saved_dist_opt else "without"
        raise CheckpointError(
            f"checkpoint {path} was saved {flag} --use-distributed-optimizer; the optimizer "
            "state formats differ: resume with the same setting, or pass --no-load-optim"
        )


def load_checkpoint(
    args, model_chunks, optimizer, scheduler, path: str, load_rng: bool = True
) -> TrainingProgress:
    """Load model (+ optimizer, scheduler, RNG unless disabled) from a published checkpoint.

    RNG states are per (pp, tp) rank, so pass ``load_rng=False`` when the layout changed.
    """
    load_optim = optimizer is not None and not args.no_load_optim and not args.finetune
    if load_optim:
        init_optimizer_state(optimizer)
    state = _sharded_state_dict(
        model_chunks,
        optimizer if load_optim else None,
        scheduler if load_optim else None,
        TrainingProgress(0, 0, 1, {}),
        args,
        True,
    )
    if args.no_load_rng or args.finetune or not load_rng:
        state.pop("rng_state")
    verify_files(path, read_checkpoint_meta(path).get("files", {}))
    try:
        loaded = dist_checkpointing.load(state, path)
    except Exception as err:
        raise CheckpointError(
            f"cannot load checkpoint {path}: {type(err).__name__}: {err}"
        ) from err
    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        _unwrap(chunk).load_state_dict(loaded[key], strict=True)
    if load_optim:
        optimizer.load_state_dict(loaded["optimizer"])
        unshare_adam_steps(optimizer)
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if "rng_state" in loaded:
        _restore_rng(loaded["rng_state"])
    progress = loaded["progress"]
    if args.finetune:
        return TrainingProgress(0, 0, 2, {})
    return TrainingProgress(
        iteration=int(progress["iteration"]),
        consumed_samples=int(progress["consumed_samples"]),
        phase=int(progress["phase"]),
        data_state=progress["data_state"],
        skipped_iterations=int(progress.get("skipped_iterations", 0)),
    )


def _restore_rng(rng_state) -> None:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    rng = rng_state[0] if isinstance(rng_state, list) else rng_state
    random.setstate(rng["random_rng_state"])
    np.random.set_state(rng["np_rng_state"])
    torch.set_rng_state(rng["torch_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(rng["rng_tracker_states"])
