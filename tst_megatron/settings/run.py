"""`RunConfig`: every section of one run, and the checks that span sections."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tst_megatron.config import TSTConfig
from tst_megatron.settings.batch import BatchConfig
from tst_megatron.settings.checkpoint import CheckpointConfig
from tst_megatron.settings.checks import SettingsError
from tst_megatron.settings.data import DataConfig
from tst_megatron.settings.environment import Environment
from tst_megatron.settings.kernels import KernelsConfig
from tst_megatron.settings.logs import LoggingConfig
from tst_megatron.settings.model import ModelConfig
from tst_megatron.settings.optimizer import OptimizerConfig
from tst_megatron.settings.parallel import ParallelConfig
from tst_megatron.settings.precision import PrecisionConfig
from tst_megatron.settings.recompute import RecomputeConfig
from tst_megatron.settings.reliability import ReliabilityConfig
from tst_megatron.settings.schedule import ScheduleConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """The resolved settings of one run, one section per concern, and the `Environment` they
    were resolved for. Entry points hold it; library modules take the sections they need.
    """

    environment: Environment
    model: ModelConfig
    parallel: ParallelConfig
    recompute: RecomputeConfig
    precision: PrecisionConfig
    kernels: KernelsConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    batch: BatchConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    reliability: ReliabilityConfig
    tst: TSTConfig

    def __post_init__(self) -> None:
        self.kernels.check(self.environment)
        per_step = self.batch.micro_batch_size * self.parallel.data_parallel_size
        if self.batch.global_batch_size % per_step:
            raise SettingsError(
                f"--global-batch-size {self.batch.global_batch_size} is not divisible by "
                f"--micro-batch-size {self.batch.micro_batch_size} x data-parallel size "
                f"{self.parallel.data_parallel_size} = {per_step}"
            )

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per step and data-parallel rank (after any batch-size ramp-up)."""
        per_step = self.batch.micro_batch_size * self.parallel.data_parallel_size
        return self.batch.global_batch_size // per_step

    def with_padded_vocab_size(self, padded_vocab_size: int) -> RunConfig:
        """This configuration with the model's vocabulary padded as the tokenizer decided
        (``--vocab-size`` or the tokenizer's, padded to a multiple of
        ``--make-vocab-size-divisible-by`` x TP)."""
        model = dataclasses.replace(self.model, padded_vocab_size=padded_vocab_size)
        return dataclasses.replace(self, model=model)

    def to_dict(self) -> dict[str, Any]:
        """Every field, nested per section, JSON-ready (tuples become lists in JSON)."""
        return dataclasses.asdict(self)
