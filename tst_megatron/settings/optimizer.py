"""The optimizer (Megatron-Core's `OptimizerConfig` fields that the flags set)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tst_megatron.settings.checks import SettingsError, check_non_negative


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerConfig:
    """AdamW (``adam``, decoupled weight decay) or SGD, and gradient clipping.

    Weight decay moves from ``start_weight_decay`` to ``end_weight_decay`` by
    ``weight_decay_incr_style`` (both equal ``weight_decay`` when constant). ``clip_grad`` 0 =
    no clipping.
    """

    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = 0.01
    start_weight_decay: float = 0.01
    end_weight_decay: float = 0.01
    weight_decay_incr_style: Literal["constant", "linear", "cosine"] = "constant"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def __post_init__(self) -> None:
        check_non_negative("--clip-grad", self.clip_grad)
        if self.weight_decay_incr_style == "constant" and not (
            self.start_weight_decay == self.end_weight_decay == self.weight_decay
        ):
            raise SettingsError(
                "--start-weight-decay/--end-weight-decay need --weight-decay-incr-style "
                "linear or cosine (with constant, --weight-decay applies throughout)"
            )
