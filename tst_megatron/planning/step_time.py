"""Step time from the model FLOPs, an assumed MFU and the pipeline bubble.

The assumed MFU applies to the hardware FLOPs, so full recomputation (one more forward) costs
4/3, and the pipeline bubble ``(PP - 1) / (V M)`` comes on top.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MFU = 0.40
RECOMPUTE_COST = 4 / 3  # full recomputation runs every forward twice: 4 passes' work for 3


@dataclass(frozen=True)
class StepTime:
    """Seconds per step and the pipeline bubble's share on top of the compute."""

    seconds: float
    bubble: float


def step_time(
    flops: float,
    world_size: int,
    peak_tflops: float,
    mfu: float,
    *,
    recomputed_fraction: float,
    pp: int,
    vpp: int,
    num_microbatches: int,
) -> StepTime:
    """Time of one step of ``flops`` model FLOPs on ``world_size`` GPUs.

    ``recomputed_fraction``: the share of the forward pass full recomputation runs again
    (1 with ``--recompute-method uniform``, N / layers per stage with ``block``).
    """
    compute = flops / (world_size * peak_tflops * 1e12 * mfu)
    compute *= 1 + recomputed_fraction * (RECOMPUTE_COST - 1)
    bubble = (pp - 1) / (vpp * num_microbatches)
    return StepTime(seconds=compute * (1 + bubble), bubble=bubble)
