"""The run's length and learning-rate schedule, which TST phase this job runs, and its seed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tst_megatron.settings.checks import SettingsError, check_positive


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleConfig:
    """``train_iters`` optimizer steps over all jobs; the learning rate warms up linearly
    over ``lr_warmup_iters`` (resolved from ``--lr-warmup-fraction`` when given), then decays
    over ``lr_decay_iters`` (default ``train_iters``) by ``lr_decay_style``.

    ``tst_phase``: ``auto`` switches TST phases in this job, ``1`` / ``2`` runs one of them.
    ``seed``: Megatron-LM's ``--seed`` (weights, dropout, the data order).
    """

    train_iters: int
    lr: float
    min_lr: float = 0.0
    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"] = "linear"
    lr_decay_iters: int
    lr_wsd_decay_style: Literal["exponential", "linear", "cosine"] = "exponential"
    lr_wsd_decay_iters: int | None = None
    lr_warmup_iters: int = 0
    lr_warmup_init: float = 0.0
    tst_phase: Literal["auto", "1", "2"] = "auto"
    seed: int = 1234

    def __post_init__(self) -> None:
        check_positive("--train-iters", self.train_iters)
        check_positive("--lr-decay-iters", self.lr_decay_iters)
        if self.min_lr > self.lr:
            raise SettingsError(f"--min-lr {self.min_lr} is larger than --lr {self.lr}")
        if not 0 <= self.lr_warmup_iters < self.lr_decay_iters:
            raise SettingsError(
                f"--lr-warmup-iters {self.lr_warmup_iters} must be >= 0 and smaller than "
                f"--lr-decay-iters {self.lr_decay_iters}"
            )
        if self.lr_decay_style == "WSD" and self.lr_wsd_decay_iters is None:
            raise SettingsError(
                "--lr-decay-style WSD needs --lr-wsd-decay-iters (the length of the final decay)"
            )
