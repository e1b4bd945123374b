"""The parallel layout: how the world's ranks split the model, the data and the gradients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tst_megatron.settings.checks import SettingsError, check_positive
from tst_megatron.settings.environment import Backend


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelConfig:
    """Megatron-LM's parallelism flags plus what the world size derives from them.

    ``data_parallel_size`` = world / (TP x PP x CP). ``virtual_pipeline_model_parallel_size``
    is the interleaved schedule's model chunks per stage (None without interleaving), from
    ``--num-layers-per-virtual-pipeline-stage``. ``expert_tensor_parallel_size`` defaults to TP.
    """

    world_size: int
    data_parallel_size: int
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    num_layers_per_virtual_pipeline_stage: int | None = None
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    overlap_p2p_comm: bool = True
    use_torch_fsdp2: bool = False
    torch_fsdp2_reshard_after_forward: bool = True
    use_megatron_fsdp: bool = False
    data_parallel_sharding_strategy: Literal[
        "no_shard", "optim", "optim_grads", "optim_grads_params"
    ] = "no_shard"
    distributed_backend: Backend = "gloo"
    distributed_timeout_minutes: int = 10

    def __post_init__(self) -> None:
        for flag, value in (
            ("--tensor-model-parallel-size", self.tensor_model_parallel_size),
            ("--pipeline-model-parallel-size", self.pipeline_model_parallel_size),
            ("--context-parallel-size", self.context_parallel_size),
            ("--expert-model-parallel-size", self.expert_model_parallel_size),
            ("--expert-tensor-parallel-size", self.expert_tensor_parallel_size),
            ("--distributed-timeout-minutes", self.distributed_timeout_minutes),
        ):
            check_positive(flag, value)
        if self.model_parallel_size * self.data_parallel_size != self.world_size:
            raise SettingsError(
                f"world size {self.world_size} is not --tensor-model-parallel-size "
                f"{self.tensor_model_parallel_size} x --pipeline-model-parallel-size "
                f"{self.pipeline_model_parallel_size} x --context-parallel-size "
                f"{self.context_parallel_size} x data-parallel size {self.data_parallel_size}"
            )

    def mcore_sizes(self) -> dict[str, int | None]:
        """The layout as Megatron-Core's ``initialize_model_parallel`` and `TransformerConfig`
        both take it (TP, PP, virtual PP, CP, EP, expert TP)."""
        return {
            "tensor_model_parallel_size": self.tensor_model_parallel_size,
            "pipeline_model_parallel_size": self.pipeline_model_parallel_size,
            "virtual_pipeline_model_parallel_size": self.virtual_pipeline_model_parallel_size,
            "context_parallel_size": self.context_parallel_size,
            "expert_model_parallel_size": self.expert_model_parallel_size,
            "expert_tensor_parallel_size": self.expert_tensor_parallel_size,
        }

    @property
    def model_parallel_size(self) -> int:
        """Ranks one model replica spans: TP x PP x CP."""
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )
