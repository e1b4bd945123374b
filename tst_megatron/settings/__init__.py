"""Typed, frozen run settings: one section per concern, resolved against an `Environment`.

The path of a run's configuration (docs/architecture.md): flags and ``--yaml-config`` ->
`argparse.Namespace` (`tst_megatron.training.arguments`) -> `validate_args` -> `RunConfig`
(`tst_megatron.training.run_config`, the one flag -> field mapping) -> each module takes
the sections it needs. Sections import nothing of ``tst_megatron`` but `config` (the TST
section, `TSTConfig`), `kernels` and each other.
"""

from tst_megatron.config import TSTConfig
from tst_megatron.settings.batch import BatchConfig
from tst_megatron.settings.checkpoint import CheckpointConfig
from tst_megatron.settings.checks import SettingsError
from tst_megatron.settings.data import DataConfig
from tst_megatron.settings.environment import Environment
from tst_megatron.settings.kernels import Fusions, KernelsConfig
from tst_megatron.settings.logs import LoggingConfig
from tst_megatron.settings.model import ModelConfig, MoEConfig
from tst_megatron.settings.optimizer import OptimizerConfig
from tst_megatron.settings.parallel import ParallelConfig
from tst_megatron.settings.precision import PrecisionConfig
from tst_megatron.settings.recompute import RecomputeConfig
from tst_megatron.settings.reliability import ReliabilityConfig
from tst_megatron.settings.run import RunConfig
from tst_megatron.settings.schedule import ScheduleConfig

__all__ = [
    "BatchConfig",
    "CheckpointConfig",
    "DataConfig",
    "Environment",
    "Fusions",
    "KernelsConfig",
    "LoggingConfig",
    "MoEConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "RecomputeConfig",
    "ReliabilityConfig",
    "RunConfig",
    "ScheduleConfig",
    "SettingsError",
    "TSTConfig",
]
