"""Data-parallel wrapping of the model chunks, as Megatron-LM's ``get_model`` picks it.

- DDP (default): Megatron-Core's `DistributedDataParallel` (contiguous fp32 ``main_grad``
  buffers, bucketed all-reduce or, with ``--use-distributed-optimizer``, reduce-scatter).
- ``--use-torch-fsdp2``: Megatron-Core's `TorchFullyShardedDataParallel` over the data-parallel
  (x context-parallel) group: PyTorch FSDP2 ``fully_shard`` on every transformer layer, the
  embedding and the root, so parameters, gradients and optimizer state are DTensors sharded
  along dim 0 over data parallel and each unit is all-gathered just before it runs.
  The TST hooks that read the embedding and output weights outside ``forward``
  (`TSTGPTModel.fsdp_forward_methods`) are registered as FSDP forward methods, so their unit
  is gathered before them and their gradients are reduce-scattered like ``forward``'s.
- ``--use-megatron-fsdp``: Megatron-Core's own `FullyShardedDataParallel` (Megatron-FSDP,
  CUDA only), with ``--data-parallel-sharding-strategy``.

`local_grad_shards` gives the NaN/Inf check every gradient this rank holds, whichever wrapper.
"""

from __future__ import annotations

from typing import cast

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    FullyShardedDataParallel,
    TorchFullyShardedDataParallel,
    TorchFullyShardedDataParallelConfig,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.utils import to_local_if_dtensor, unwrap_model
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from tst_megatron.settings import ParallelConfig, PrecisionConfig
from tst_megatron.training.checkpoint_files import CheckpointError

__all__ = ["check_even_shards", "fsdp_kind", "local_grad_shards", "wrap_chunk"]


def fsdp_kind(parallel: ParallelConfig) -> str | None:
    """Which FSDP the layout asks for: "torch_fsdp2", "megatron_fsdp", or None (DDP)."""
    if parallel.use_torch_fsdp2:
        return "torch_fsdp2"
    if parallel.use_megatron_fsdp:
        return "megatron_fsdp"
    return None


def wrap_chunk(
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    config: TransformerConfig,
    model: torch.nn.Module,
    index: int,
    *,
    checkpointed: bool,
) -> torch.nn.Module:
    """Model chunk ``index`` (a `TSTGPTModel`, ``Float16Module``-wrapped in bf16) in its
    data-parallel wrapper; chunks after the first do not bucket (Megatron-LM's rule).

    ``checkpointed`` (``--save`` or ``--load``): FSDP2 shards must suit torch_dist
    (`check_even_shards`).
    """
    kind = fsdp_kind(parallel)
    if kind == "torch_fsdp2":
        chunk = TorchFullyShardedDataParallel(
            config,
            TorchFullyShardedDataParallelConfig(
                reshard_after_forward=parallel.torch_fsdp2_reshard_after_forward
            ),
            model,
            disable_bucketing=index > 0,
        )
        for module, method in unwrap_model(chunk).fsdp_forward_methods():
            register_fsdp_forward_method(module, method)
        if checkpointed:
            check_even_shards(chunk, swiglu=config.gated_linear_unit)
        return chunk
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=precision.accumulate_allreduce_grads_in_fp32,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        use_megatron_fsdp=kind == "megatron_fsdp",
        data_parallel_sharding_strategy=parallel.data_parallel_sharding_strategy,
    )
    wrapper = FullyShardedDataParallel if kind == "megatron_fsdp" else DistributedDataParallel
    return wrapper(config, ddp_config, model, disable_bucketing=index > 0)


def check_even_shards(chunk: torch.nn.Module, swiglu: bool) -> None:
    """torch_dist describes an FSDP2 shard as an even part of dim 0: refuse uneven ones.

    Raises:
        CheckpointError: naming the first parameter whose (TP-local) first dimension does not split
            evenly over the FSDP group, or, with SwiGLU, an odd FSDP size (a shard of the fused
            ``[W; V]`` fc1 would straddle W and V).
    """
    for name, param in chunk.named_parameters():
        if not isinstance(param, DTensor):
            continue
        size, rows = param.device_mesh.size(), param.shape[0]
        straddles = swiglu and "linear_fc1" in name and size > 1 and (size % 2 or rows % size)
        if rows % size or straddles:
            raise CheckpointError(
                f"--use-torch-fsdp2 checkpoints: {name} has {rows} rows (per tensor-parallel "
                f"rank), which do not split evenly over the {size} data-parallel (x context-"
                "parallel) ranks"
                + (" into whole halves of SwiGLU's [W; V]" if straddles else "")
                + "; choose a data-parallel size that divides them (an even one with --swiglu)"
            )


def local_grad_shards(chunk: torch.nn.Module) -> list[torch.Tensor]:
    """Every gradient tensor this rank holds for ``chunk`` after the gradient reduction.

    DDP: its contiguous grad buffers (dense and expert-parallel). FSDP: each parameter's local
    shard of its sharded gradient (``main_grad`` where the wrapper keeps one, else ``grad``).
    """
    if hasattr(chunk, "expert_parallel_buffers"):  # DDP's buffers
        ddp = cast(DistributedDataParallel, chunk)
        return [buffer.grad_data for buffer in [*ddp.buffers, *ddp.expert_parallel_buffers]]
    shards = []
    for param in chunk.parameters():
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad
        if grad is not None:
            shards.append(to_local_if_dtensor(grad))
    return shards
