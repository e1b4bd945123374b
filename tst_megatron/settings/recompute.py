"""Activation recomputation (Megatron-LM's ``--recompute-*`` flags)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tst_megatron.settings.checks import SettingsError

RecomputeModule = Literal["core_attn", "moe_act", "layernorm", "mlp", "moe", "shared_experts"]


@dataclass(frozen=True, kw_only=True, slots=True)
class RecomputeConfig:
    """What backward recomputes instead of keeping.

    ``recompute_granularity`` None = nothing (``--recompute-activations`` means selective);
    ``full`` needs ``recompute_method`` and ``recompute_num_layers``; ``selective`` recomputes
    ``recompute_modules`` (None = Megatron-Core's default, core attention).
    """

    recompute_granularity: Literal["full", "selective"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None
    recompute_modules: tuple[RecomputeModule, ...] | None = None

    def __post_init__(self) -> None:
        full = self.recompute_granularity == "full"
        if {full} != {self.recompute_method is not None, self.recompute_num_layers is not None}:
            raise SettingsError(
                "--recompute-granularity full needs --recompute-method and "
                "--recompute-num-layers, and they apply to it alone; got "
                f"{self.recompute_granularity}, {self.recompute_method}, "
                f"{self.recompute_num_layers}"
            )
        if self.recompute_modules is not None and self.recompute_granularity != "selective":
            raise SettingsError(
                "--recompute-modules needs selective recomputation (--recompute-activations or "
                "--recompute-granularity selective)"
            )
