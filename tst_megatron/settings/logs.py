"""What a run reports: log lines, evaluations, TensorBoard / W&B / JSONL, timers, MFU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tst_megatron.settings.checks import SettingsError, check_non_negative, check_positive


@dataclass(frozen=True, kw_only=True, slots=True)
class LoggingConfig:
    """``log_interval`` steps between log lines, an evaluation of ``eval_iters`` batches every
    ``eval_interval`` steps (0 iterations = none).

    ``peak_tflops`` is the MFU denominator (``--peak-tflops``, else the device's dense BF16
    peak; None on CPU). ``timing_log_level`` / ``timing_log_option`` /
    ``barrier_with_L1_time`` / ``log_timers_to_tensorboard`` are Megatron-LM's timer flags.
    """

    log_interval: int = 100
    eval_interval: int = 1000
    eval_iters: int = 100
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    wandb_save_dir: str | None = None
    metrics_jsonl: str | None = None
    log_throughput: bool = False
    peak_tflops: float | None = None
    timing_log_level: Literal[0, 1, 2] = 0
    timing_log_option: Literal["max", "minmax", "all"] = "minmax"
    barrier_with_L1_time: bool = True
    log_timers_to_tensorboard: bool = False

    def __post_init__(self) -> None:
        check_positive("--log-interval", self.log_interval)
        check_positive("--eval-interval", self.eval_interval)
        check_non_negative("--eval-iters", self.eval_iters)
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise SettingsError(f"--peak-tflops must be > 0, got {self.peak_tflops}")
        if self.log_timers_to_tensorboard and not (self.tensorboard_dir or self.wandb_project):
            raise SettingsError(
                "--log-timers-to-tensorboard needs --tensorboard-dir (or --wandb-project)"
            )
