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

import os
from collections.abc import Mapping, MutableMapping

import torch

from tst_megatron.settings.environment import Environment
from tst_megatron.settings.parallel import ParallelConfig

CUDA_CONNECTIONS = "CUDA_DEVICE_MAX_CONNECTIONS"


def local_device_index(local_rank: int, device_count: int) -> int:
    """The CUDA device of the rank with ``LOCAL_RANK`` ``local_rank`` (Megatron-LM's rule)."""
    if device_count < 1:
        raise RuntimeError("no CUDA device is visible to this rank")
    return local_rank % device_count


def needs_single_connection(
    *, tensor_parallel: int, context_parallel: int, fsdp: bool, arch_major: int | None
) -> bool:
    """Megatron-LM's rule: TP or CP > 1 on a GPU before Blackwell (capability < 10), unless
    FSDP (``--use-torch-fsdp2`` / ``--use-megatron-fsdp``) is on (FSDP needs several
    connections; Megatron-LM then only warns)."""
    if fsdp:
        return False
    parallel = tensor_parallel > 1 or context_parallel > 1
    return parallel and arch_major is not None and arch_major < 10


def cuda_connections_error(
    *,
    tensor_parallel: int,
    context_parallel: int,
    fsdp: bool,
    arch_major: int | None,
    environ: Mapping[str, str],
) -> str | None:
    """Why ``environ`` cannot run this layout (the variable unset or not 1), else None.

    ``tensor_parallel`` / ``context_parallel``: ``--tensor-model-parallel-size`` /
    ``--context-parallel-size``; ``fsdp``: either FSDP flag.
    """
    value = environ.get(CUDA_CONNECTIONS)
    needed = needs_single_connection(
        tensor_parallel=tensor_parallel,
        context_parallel=context_parallel,
        fsdp=fsdp,
        arch_major=arch_major,
    )
    if not needed or value == "1":
        return None
    found = "is not set" if value is None else f"is {value}"
    return (
        f"{CUDA_CONNECTIONS} {found}, but --tensor-model-parallel-size "
        f"{tensor_parallel} / --context-parallel-size "
        f"{context_parallel} on this GPU (compute capability {arch_major}.x, before "
        f"Blackwell) needs {CUDA_CONNECTIONS}=1 in the environment before CUDA starts, as "
        f"Megatron-LM requires (communication then overlaps with compute): export "
        f"{CUDA_CONNECTIONS}=1 in the launch script (examples/slurm/common.sh, tools/launch.py "
        "and the Dockerfile set it)"
    )


def launch_error(
    parallel: ParallelConfig, env: Environment, environ: Mapping[str, str]
) -> str | None:
    """Why a launch with the variables ``environ`` cannot run the layout ``parallel`` on
    ``env``, else None: FSDP refuses ``CUDA_DEVICE_MAX_CONNECTIONS=1`` (it overlaps its
    collectives on several queues), TP/CP before Blackwell need it (`cuda_connections_error`)."""
    fsdp = parallel.use_torch_fsdp2 or parallel.use_megatron_fsdp
    if fsdp and environ.get(CUDA_CONNECTIONS) == "1":
        flag = "--use-torch-fsdp2" if parallel.use_torch_fsdp2 else "--use-megatron-fsdp"
        return (
            f"{flag}: FSDP needs {CUDA_CONNECTIONS} unset or > 1 (it overlaps its "
            f"all-gathers and reduce-scatters on several queues), got "
            f"{CUDA_CONNECTIONS}=1: export {CUDA_CONNECTIONS}=8 before the "
            "launcher (tools/launch.py, examples/slurm/common.sh and the Dockerfile set 1 only "
            "when it is not set)"
        )
    return cuda_connections_error(
        tensor_parallel=parallel.tensor_model_parallel_size,
        context_parallel=parallel.context_parallel_size,
        fsdp=fsdp,
        arch_major=env.capability[0] if env.capability else None,
        environ=environ,
    )


def set_cuda_device(environ: MutableMapping[str, str] = os.environ) -> int:
    """Make this rank's device (`local_device_index`) current; returns its index."""
    index = local_device_index(int(environ.get("LOCAL_RANK", 0)), torch.cuda.device_count())
    torch.cuda.set_device(index)
    return index
