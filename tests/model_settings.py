"""The trainer's model of a `RunConfig`, for tests: its `TransformerConfig` and one stage."""

from __future__ import annotations

from megatron.core.transformer import TransformerConfig

from tst_megatron.model import TSTGPTModel
from tst_megatron.settings import RunConfig
from tst_megatron.training.loop import run_transformer_config as config_of
from tst_megatron.training.loop import whole_model

__all__ = ["config_of", "model_of"]


def model_of(settings: RunConfig, config: TransformerConfig | None = None) -> TSTGPTModel:
    """The whole model (first and last stage) of ``settings`` (``config``: `config_of`)."""
    return whole_model(settings, config or config_of(settings))
