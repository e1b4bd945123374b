"""Numerics: the training dtype, FP8 and fp16 loss scaling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tst_megatron.settings.checks import SettingsError

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}


@dataclass(frozen=True, kw_only=True, slots=True)
class PrecisionConfig:
    """``params_dtype``: ``bf16`` (``--bf16``), ``fp16`` (``--fp16``) or ``fp32``.

    ``fp8`` is the FP8 format (None = no FP8 GEMMs). ``loss_scale`` None = dynamic fp16 loss
    scaling from ``initial_loss_scale``. ``accumulate_allreduce_grads_in_fp32`` is always on
    with bf16 (Megatron-LM's rule).
    """

    params_dtype: Literal["bf16", "fp16", "fp32"] = "fp32"
    fp8: Literal["e4m3", "hybrid"] | None = None
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    fp8_param_gather: bool = False
    attention_softmax_in_fp32: bool = False
    accumulate_allreduce_grads_in_fp32: bool = False
    loss_scale: float | None = None
    initial_loss_scale: float = 2.0**32
    min_loss_scale: float = 1.0
    loss_scale_window: float = 1000
    hysteresis: int = 2

    def __post_init__(self) -> None:
        if self.params_dtype == "bf16" and not self.accumulate_allreduce_grads_in_fp32:
            raise SettingsError(
                "--bf16 accumulates and all-reduces gradients in fp32 "
                "(--accumulate-allreduce-grads-in-fp32 is implied)"
            )
        if self.fp8_param_gather and self.fp8 is None:
            raise SettingsError("--fp8-param-gather needs --fp8-format")
        if self.loss_scale is not None and self.loss_scale <= 0:
            raise SettingsError(f"--loss-scale must be > 0, got {self.loss_scale}")
        if not 0 < self.min_loss_scale <= self.initial_loss_scale:
            raise SettingsError(
                f"--min-loss-scale {self.min_loss_scale} must be > 0 and at most "
                f"--initial-loss-scale {self.initial_loss_scale:g}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        """``params_dtype`` as a torch dtype."""
        return DTYPES[self.params_dtype]
