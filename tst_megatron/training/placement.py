"""Where a rank runs: its CUDA device and the CUDA environment Megatron-LM requires.

- Device: ``LOCAL_RANK % torch.cuda.device_count()``. With one GPU per task (Slurm's
  ``--gpus-per-task 1``, or ``CUDA_VISIBLE_DEVICES`` set per rank) every rank sees device 0
  while ``LOCAL_RANK`` runs 0..7; ``torch.cuda.set_device(LOCAL_RANK)`` would fail there with
  "invalid device ordinal".
- ``CUDA_DEVICE_MAX_CONNECTIONS=1``: Megatron-LM (``megatron/training/arguments.py``) asserts
  it is in the environment whenever tensor or context parallelism is on and the GPU is older
  than Blackwell (compute capability < 10): with one hardware queue, the tensor-parallel
  communication kernels are scheduled in issue order, ahead of the GEMMs they overlap with.
  CUDA reads it when it initialises, so it must come from the launcher
  (``examples/slurm/common.sh``, ``tools/launch.py``, the Dockerfile), never from this
  process: the entry point reads the compute capability (`Environment.detect`:
  ``get_device_capability``, which initialises CUDA here, as Megatron-LM's
  ``get_device_arch_version`` does) and refuses a missing or other value
  (`cuda_connections_error`). Megatron-FSDP is exempt (Megatron-LM
  warns there instead: FSDP wants more queues), and FSDP refuses the value 1.

The variable belongs to the launch, not to the configuration: the entry points check it
(`launch_error`) after `validate_args`, for the machine they run on, so settings resolved for
a described GPU node (`Environment.gpu`) do not depend on this host's environment.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, MutableMapping

import torch

from tst_megatron.settings.environment import Environment

CUDA_CONNECTIONS = "CUDA_DEVICE_MAX_CONNECTIONS"


def local_device_index(local_rank: int, device_count: int) -> int:
    """The CUDA device of the rank with ``LOCAL_RANK`` ``local_rank`` (Megatron-LM's rule)."""
    if device_count < 1:
        raise RuntimeError("no CUDA device is visible to this rank")
    return local_rank % device_count


def needs_single_connection(args: argparse.Namespace, arch_major: int | None) -> bool:
    """Megatron-LM's rule: TP or CP > 1 on a GPU before Blackwell (capability < 10), unless
    FSDP is on (FSDP needs several connections; Megatron-LM then only warns)."""
    if getattr(args, "use_torch_fsdp2", False) or getattr(args, "use_megatron_fsdp", False):
        return False
    parallel = args.tensor_model_parallel_size > 1 or args.context_parallel_size > 1
    return parallel and arch_major is not None and arch_major < 10


def cuda_connections_error(
    args: argparse.Namespace, arch_major: int | None, environ: Mapping[str, str]
) -> str | None:
    """Why this environment cannot run ``args`` (the variable unset or not 1), else None."""
    value = environ.get(CUDA_CONNECTIONS)
    if not needs_single_connection(args, arch_major) or value == "1":
        return None
    found = "is not set" if value is None else f"is {value}"
    return (
        f"{CUDA_CONNECTIONS} {found}, but --tensor-model-parallel-size "
        f"{args.tensor_model_parallel_size} / --context-parallel-size "
        f"{args.context_parallel_size} on this GPU (compute capability {arch_major}.x, before "
        f"Blackwell) needs {CUDA_CONNECTIONS}=1 in the environment before CUDA starts, as "
        f"Megatron-LM requires (communication then overlaps with compute): export "
        f"{CUDA_CONNECTIONS}=1 in the launch script (examples/slurm/common.sh, tools/launch.py "
        "and the Dockerfile set it)"
    )


def launch_error(
    args: argparse.Namespace, env: Environment, environ: Mapping[str, str]
) -> str | None:
    """Why a launch with the variables ``environ`` cannot run validated ``args`` on ``env``,
    else None: FSDP refuses ``CUDA_DEVICE_MAX_CONNECTIONS=1`` (it overlaps its collectives on
    several queues), TP/CP before Blackwell need it (`cuda_connections_error`)."""
    fsdp = args.use_torch_fsdp2 or args.use_megatron_fsdp
    if fsdp and environ.get(CUDA_CONNECTIONS) == "1":
        flag = "--use-torch-fsdp2" if args.use_torch_fsdp2 else "--use-megatron-fsdp"
        return (
            f"{flag}: FSDP needs {CUDA_CONNECTIONS} unset or > 1 (it overlaps its "
            f"all-gathers and reduce-scatters on several queues), got "
            f"{CUDA_CONNECTIONS}=1: export {CUDA_CONNECTIONS}=8 before the "
            "launcher (tools/launch.py, examples/slurm/common.sh and the Dockerfile set 1 only "
            "when it is not set)"
        )
    arch_major = env.capability[0] if env.capability else None
    return cuda_connections_error(args, arch_major, environ)


def set_cuda_device(environ: MutableMapping[str, str] = os.environ) -> int:
    """Make this rank's device (`local_device_index`) current; returns its index."""
    index = local_device_index(int(environ.get("LOCAL_RANK", 0)), torch.cuda.device_count())
    torch.cuda.set_device(index)
    return index
