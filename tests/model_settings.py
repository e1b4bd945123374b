"""The trainer's model of a `RunConfig`, for tests: its `TransformerConfig` and one stage."""

from __future__ import annotations

from megatron.core.transformer import TransformerConfig

from tst_megatron.model import TSTGPTModel
from tst_megatron.settings import RunConfig
from tst_megatron.training.model_builder import build_model, transformer_config


def config_of(settings: RunConfig) -> TransformerConfig:
    """`transformer_config` of ``settings``' sections, as the trainer builds it."""
    return transformer_config(
        settings.model,
        settings.parallel,
        settings.precision,
        settings.kernels,
        settings.recompute,
        calculate_per_token_loss=settings.batch.calculate_per_token_loss,
        barrier_with_L1_time=settings.logging.barrier_with_L1_time,
    )


def model_of(settings: RunConfig, config: TransformerConfig | None = None) -> TSTGPTModel:
    """The whole model (first and last stage) of ``settings`` (``config``: `config_of`)."""
    return build_model(
        settings.model,
        settings.kernels,
        config or config_of(settings),
        document_attention=settings.data.reset_attention_mask,
        pre_process=True,
        post_process=True,
    )
