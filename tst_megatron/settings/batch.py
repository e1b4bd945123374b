"""The batch: samples per micro-batch and per optimizer step, and how the loss averages."""

from __future__ import annotations

from dataclasses import dataclass

from tst_megatron.settings.checks import check_positive


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchConfig:
    """``global_batch_size`` samples per step (default micro-batch x data-parallel size),
    ``micro_batch_size`` per model replica and micro-batch.

    ``rampup_batch_size``: (start, increment, samples) or None. ``calculate_per_token_loss``:
    normalise by the global batch's loss tokens instead of averaging micro-batch means.
    In TST phase 1 a sample is one configured sample (``--tst-fold batch`` runs s model
    samples for it, see `tst_megatron.config.PhaseSpec`).
    """

    micro_batch_size: int
    global_batch_size: int
    rampup_batch_size: tuple[int, int, int] | None = None
    calculate_per_token_loss: bool = False

    def __post_init__(self) -> None:
        check_positive("--micro-batch-size", self.micro_batch_size)
        check_positive("--global-batch-size", self.global_batch_size)
