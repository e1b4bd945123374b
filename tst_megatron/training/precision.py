"""bf16 / fp16 training set up the way Megatron-LM's ``megatron/training/training.py`` does it.

- `wrap_model_chunk` (``get_model``): after the move to the GPU each model chunk is wrapped in
  Megatron-Core's ``Float16Module``, which casts every parameter and buffer of the chunk to
  bf16/fp16 (the learned position table, the norms, ...), casts the floating-point inputs of
  the first pipeline stage and returns the last stage's output (the per-position loss) in
  fp32. DDP then keeps fp32 ``main_grad`` buffers (bf16 always, fp16 with
  ``--accumulate-allreduce-grads-in-fp32``) and the optimizer fp32 main parameters.
- `attach_loss_scale` (``setup_model_and_optimizer`` callers, right after the optimizer is
  built): ``config.grad_scale_func = optimizer.scale_loss``. The pipeline schedules multiply
  the loss by it before backward and scale the MoE auxiliary losses with it
  (``MoEAuxLossAutoScaler``); the optimizer divides the gradients by it again. Without it an
  fp16 run trains on gradients divided by 2**32 (grad norm 0.000) and the aux losses are off
  by the same factor.
- fp16 dynamic loss scaling: ``optimizer.step()`` reports an overflow (``update_successful``
  False), skips the update and lowers the scale; the loop counts those steps as skipped (see
  `tst_megatron.training.faults.StepHealth` for how they differ from NaN steps).
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import get_model_config, unwrap_model

__all__ = ["attach_loss_scale", "current_loss_scale", "unwrap", "wrap_model_chunk"]


def wrap_model_chunk(model: torch.nn.Module, config: TransformerConfig) -> torch.nn.Module:
    """``Float16Module(config, model)`` for bf16/fp16 (as ``get_model``), else ``model``."""
    if config.fp16 or config.bf16:
        return Float16Module(config, model)
    return model


def attach_loss_scale(model_chunks: list, optimizer) -> None:
    """Scale the loss by the optimizer's loss scale in the schedules (Megatron-LM's setup)."""
    get_model_config(model_chunks[0]).grad_scale_func = optimizer.scale_loss


def current_loss_scale(optimizer) -> float:
    """The optimizer's loss scale now (1.0 without a grad scaler)."""
    return float(optimizer.get_loss_scale())


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / FSDP / ``Float16Module`` wrappers (Megatron-FSDP's inner
    `MegatronFSDP` module included, which `unwrap_model` does not know)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        FullyShardedDataParallel,
        TorchFullyShardedDataParallel,
    )
    from megatron.core.distributed.fsdp.src.megatron_fsdp import MegatronFSDP

    return unwrap_model(
        chunk,
        (
            DistributedDataParallel,
            TorchFullyShardedDataParallel,
            FullyShardedDataParallel,
            MegatronFSDP,
            Float16Module,
        ),
    )
