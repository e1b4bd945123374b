"""The allowed range of every numeric flag that torch or Megatron would reject later.

Checked by `arguments.validate_args` before any expensive work, so that ``--lr nan``,
``--hidden-dropout 1.5`` or ``--adam-beta1 1.5`` are one line naming the flag, its value and
what is allowed, not torch's traceback at the first step (or a silently disabled feature:
``--clip-grad nan`` turned clipping off). Ranges follow torch's own checks (``Adam``: ``0 <=
lr``, ``0 <= eps``, ``0 <= beta < 1``, ``0 <= weight_decay``; ``Dropout``: ``0 <= p <= 1``;
``normal_``: ``std >= 0``) tightened where a bound value is no training run (a dropout of 1
zeroes every activation, a zero std or norm epsilon is no initialisation or normalisation).
"""

from __future__ import annotations

import math
from argparse import Namespace
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """``low`` / ``high`` bounds (None: unbounded), each inclusive unless ``open_*``."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return self.high is None or not (
            value > self.high or (self.open_high and value == self.high)
        )

    def describe(self) -> str:
        if self.high is None:
            return f"a finite number {'>' if self.open_low else '>='} {self.low:g}"
        left = "(" if self.open_low else "["
        right = ")" if self.open_high else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


NON_NEGATIVE = Range(0.0)
POSITIVE = Range(0.0, open_low=True)
PROBABILITY = Range(0.0, 1.0, open_high=True)  # a dropout of 1 zeroes every activation
BETA = Range(0.0, 1.0, open_high=True)
FRACTION = Range(0.0, 1.0, open_low=True)

RANGES: dict[str, Range] = {
    "lr": NON_NEGATIVE,
    "min_lr": NON_NEGATIVE,
    "lr_warmup_init": NON_NEGATIVE,
    "lr_warmup_fraction": Range(0.0, 1.0),
    "weight_decay": NON_NEGATIVE,
    "start_weight_decay": NON_NEGATIVE,
    "end_weight_decay": NON_NEGATIVE,
    "adam_beta1": BETA,
    "adam_beta2": BETA,
    "adam_eps": POSITIVE,
    "clip_grad": NON_NEGATIVE,  # 0 = off
    "hidden_dropout": PROBABILITY,
    "attention_dropout": PROBABILITY,
    "init_method_std": POSITIVE,
    "norm_epsilon": POSITIVE,
    "rotary_base": POSITIVE,
    "rotary_percent": FRACTION,
    "loss_scale": POSITIVE,
    "initial_loss_scale": POSITIVE,
    "min_loss_scale": POSITIVE,
    "loss_scale_window": POSITIVE,
    "hysteresis": Range(1.0),
    "moe_aux_loss_coeff": NON_NEGATIVE,
    "moe_z_loss_coeff": NON_NEGATIVE,
    "moe_router_topk_scaling_factor": POSITIVE,
    # --moe-expert-capacity-factor: `arguments._validate_moe_capacity` (a non-finite or
    # non-positive factor is refused there, naming dropless routing as the alternative)
    "moe_router_bias_update_rate": NON_NEGATIVE,
    "collective_timeout_s": POSITIVE,
    "distributed_timeout_minutes": POSITIVE,
    "exit_duration_in_mins": POSITIVE,
    "peak_tflops": POSITIVE,
}


def check_ranges(args: Namespace, error: type[Exception]) -> None:
    """Raise ``error`` naming the first flag of `RANGES` whose value is out of its range.

    Unset flags (None) pass; a flag holding a list (e.g. one coefficient per layer) is
    checked entry by entry.
    """
    for dest, allowed in RANGES.items():
        value = getattr(args, dest, None)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if not allowed.contains(float(item)):
                raise error(
                    f"--{dest.replace('_', '-')} must be {allowed.describe()}, got {item}"
                )
