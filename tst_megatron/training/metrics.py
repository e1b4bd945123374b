"""Megatron-style log lines plus the TST fields, TensorBoard / W&B scalars, a JSONL record.

Printed by the last rank (it holds the loss, as in Megatron-LM's ``print_rank_last``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import torch

from tst_megatron.config import PhaseSpec
from tst_megatron.settings.logs import LoggingConfig
from tst_megatron.settings.model import ModelConfig
from tst_megatron.settings.precision import PrecisionConfig
from tst_megatron.settings.schedule import ScheduleConfig
from tst_megatron.training.flops import mfu, phase_flops_per_step
from tst_megatron.training.moe_metrics import MoEIntervalLog, moe_layer_numbers
from tst_megatron.training.timers import StepTimers

if TYPE_CHECKING:
    from tst_megatron.data.samples import SampleState
    from tst_megatron.training.checkpointing import TrainingProgress


def _is_logging_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


class MetricsLogger:
    """Accumulates per-interval figures and writes them every ``--log-interval``.

    ``model`` gives the FLOPs per step and the context length, ``schedule`` the run's length,
    ``precision`` whether fp16 loss scales are logged; ``wandb_config`` is the run's
    configuration W&B records (with ``--wandb-project``).
    """

    def __init__(
        self,
        logging: LoggingConfig,
        model: ModelConfig,
        schedule: ScheduleConfig,
        precision: PrecisionConfig,
        phase1_iters: int,
        wandb_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.logging = logging
        self.shape = model
        self.train_iters = schedule.train_iters
        self.fp16 = precision.params_dtype == "fp16"
        self.phase1_iters = phase1_iters
        self.start_time = time.time()
        self.world = torch.distributed.get_world_size()
        self.peak = logging.peak_tflops
        self._interval = self._empty_interval()
        self._boundary_loss: float | None = None
        self._writers = self._open_writers(wandb_config) if _is_logging_rank() else []
        self._timers: StepTimers | None = None
        self._moe: MoEIntervalLog | None = None
        self._boundary_moe: dict | None = None

    @staticmethod
    def _empty_interval() -> dict:
        return {
            "loss": 0.0,
            "loss_kl": 0.0,
            "steps": 0,
            "time": 0.0,
            "model_tokens": 0,
            "data_tokens": 0,
            "flops": 0.0,
            "nan": 0,
            "skipped": 0,
        }

    def _open_writers(self, wandb_config: Mapping[str, Any] | None) -> list[tuple[str, Any]]:
        logging = self.logging
        writers: list[tuple[str, Any]] = []
        if logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # needs `tensorboard` installed

            writers.append(("tb", SummaryWriter(log_dir=logging.tensorboard_dir)))
        if logging.wandb_project:
            import wandb

            run = wandb.init(
                project=logging.wandb_project,
                name=logging.wandb_exp_name,
                dir=logging.wandb_save_dir,
                config=dict(wandb_config or {}),
            )
            writers.append(("wandb", run))
        if logging.metrics_jsonl:
            os.makedirs(os.path.dirname(os.path.abspath(logging.metrics_jsonl)), exist_ok=True)
            writers.append(("jsonl", open(logging.metrics_jsonl, "a")))  # noqa: SIM115 (run-long)
        return writers

    def print(self, message: str) -> None:
        if _is_logging_rank():
            print(f"[{datetime.now():%Y-%m-%d %H:%M:%S}] {message}", flush=True)

    def attach_timers(self, timers: StepTimers) -> None:
        """Report these timers every log interval (a collective: all ranks log together)."""
        self._timers = timers

    def _write(self, iteration: int, scalars: dict, kinds: tuple[str, ...] | None = None) -> None:
        for kind, writer in self._writers:
            if kinds is not None and kind not in kinds:
                continue
            if kind == "tb":
                for key, value in scalars.items():
                    if value is not None:
                        writer.add_scalar(key, value, iteration)
                writer.flush()
            elif kind == "wandb":
                writer.log(scalars, step=iteration)
            else:
                writer.write(json.dumps({"iteration": iteration, **scalars}) + "\n")
                writer.flush()

    def step(
        self,
        progress: TrainingProgress,
        spec: PhaseSpec,
        step: dict[str, Any],
        seconds: float,
        stream_state: SampleState,
        stop_at: int,
    ) -> None:
        """Add one step (``step``: the trainer's step record) and, every ``--log-interval``
        and at ``stop_at``, print the log line and write the scalars."""
        it, seq_length = self._interval, self.shape.seq_length
        gbs = step["global_batch_size"]
        it["steps"] += 1
        it["time"] += seconds
        it["loss"] += step["loss"] if step["updated"] else 0.0
        it["loss_kl"] += step.get("loss_kl", step["loss"]) if step["updated"] else 0.0
        it["model_tokens"] += gbs * seq_length
        it["data_tokens"] += gbs * spec.data_tokens_per_sample(seq_length)
        it["flops"] += phase_flops_per_step(self.shape, spec, seq_length, gbs)
        it["nan"] += int(step["nan"])
        it["skipped"] += int(not step["updated"])
        moe = step.get("moe")
        if moe is not None:
            self._moe = self._moe or MoEIntervalLog(moe_layer_numbers(self.shape))
            self._moe.add(moe)
        if progress.phase == 2 and self._boundary_loss is not None:
            self.print(
                f"phase 2, iteration {progress.iteration}: lm loss {step['loss']:.4f} "
                f"(last phase-1 loss {self._boundary_loss:.4f})"
                + (self._moe.boundary_note(self._boundary_moe, moe) if self._moe else "")
            )
            self._boundary_loss = None
        if progress.phase == 1 and progress.iteration == self.phase1_iters:
            self._boundary_loss = step["loss"]
            self._boundary_moe = moe
        if progress.iteration % self.logging.log_interval and progress.iteration != stop_at:
            return
        good = it["steps"] - it["skipped"]
        loss = it["loss"] / good if good else None  # every step of the interval was skipped
        loss_kl = it["loss_kl"] / good if good else None
        per_iter = it["time"] / it["steps"]
        tflops = it["flops"] / it["time"] / self.world / 1e12
        elapsed = time.time() - self.start_time
        eta = per_iter * (stop_at - progress.iteration)
        fold = ", batch fold" if spec.fold == "batch" else ""
        phase = (
            f"1 (s={spec.bag_size}, {spec.mode}{fold})"
            if progress.phase == 1 and not spec.is_standard
            else "2"
            if self.phase1_iters
            else "baseline"
        )
        fields = [
            f"iteration {progress.iteration:8d}/{self.train_iters:8d}",
            f"phase: {phase}",
            f"consumed samples: {progress.consumed_samples:12d}",
            f"consumed data tokens: {stream_state.consumed_tokens:14d}",
            f"elapsed time per iteration (ms): {per_iter * 1e3:.1f}",
        ]
        if self.logging.log_throughput:
            fields.append(f"throughput per GPU (TFLOP/s/GPU): {tflops:.3f}")
            if self.peak:
                fields.append(f"MFU: {100 * mfu(tflops, self.peak):.1f}%")
        fields += [
            f"tokens/s (model): {it['model_tokens'] / it['time']:.0f}",
            f"tokens/s (data): {it['data_tokens'] / it['time']:.0f}",
            f"learning rate: {step['lr']:.6E}",
            f"global batch size: {gbs:5d}",
            f"lm loss: {'n/a' if loss is None else f'{loss:.6E}'}",
            *_kl_field(spec, loss_kl),
            *([f"loss scale: {step['loss_scale']:.1f}"] if self.fp16 else []),
            f"grad norm: {_fmt(step['grad_norm'])}",
            f"number of skipped iterations: {it['skipped']:3d}",
            f"number of nan iterations: {it['nan']:3d}",
            f"elapsed: {elapsed:.0f}s ETA: {eta:.0f}s",
        ]
        moe_fields, moe_scalars = self._moe.flush() if self._moe else ([], {})
        fields += moe_fields
        self.print(" | ".join(fields) + " |")
        timer_scalars = self._log_timers(it["steps"])
        record = {
            "phase": progress.phase,
            "lr": step["lr"],
            "grad_norm": _num(step["grad_norm"]),
            "tflops_per_gpu": tflops,
            "iteration_time_s": per_iter,
            "data_tokens": stream_state.consumed_tokens,
            "data_tokens_per_s": it["data_tokens"] / it["time"],
            "model_tokens_per_s": it["model_tokens"] / it["time"],
            "skipped_iterations": it["skipped"],
            "nan_iterations": it["nan"],
        }
        if self.fp16:
            record["loss_scale"] = step["loss_scale"]
        if self.peak:
            record["mfu"] = mfu(tflops, self.peak)
        if loss is not None:
            record["lm_loss"] = loss
            record["lm_loss_kl"] = loss_kl  # MCE - target entropy (= lm loss for one target)
        record.update(moe_scalars)
        if _is_logging_rank():
            self._write_with_timers(progress.iteration, record, timer_scalars)
        self._interval = self._empty_interval()

    def _log_timers(self, steps: int, names: list[str] | None = None) -> dict[str, float]:
        """Print the timers' block (per step over ``steps``) and return their scalars."""
        if self._timers is None:
            return {}
        report = self._timers.report(
            self._timers.step_names() if names is None else names, normalizer=steps
        )
        block = self._timers.format_report(report)
        if block:
            self.print(block)
        return report.scalars()

    def _write_with_timers(self, iteration: int, record: dict, timers: dict[str, float]) -> None:
        """Timers go to the JSONL record; to TensorBoard / W&B with --log-timers-to-tensorboard."""
        full = {**record, **timers}
        self._write(iteration, full, kinds=("jsonl",))
        shown = full if self.logging.log_timers_to_tensorboard else record
        self._write(iteration, shown, kinds=("tb", "wandb"))

    def checkpoint_time(self, iteration: int, name: str) -> None:
        """Log a checkpoint timer (``save-checkpoint`` / ``load-checkpoint``); all ranks call."""
        timers = self._log_timers(1, [name])
        if _is_logging_rank() and timers:
            self._write_with_timers(iteration, {}, timers)

    def phase_boundary(self, iteration: int, stream_state: SampleState) -> None:
        self.print(
            f"TST phase boundary at iteration {iteration}: switching to standard next-token "
            f"training (weights, optimizer state and LR schedule continue; phase 1 read "
            f"{stream_state.phase_samples[0]} samples, {stream_state.consumed_tokens} data "
            "tokens; phase 2 reads its own partition of the data)"
        )

    def validation(self, iteration: int, loss: float | None, final: bool = False) -> None:
        if loss is None:
            return
        ppl = float(torch.exp(torch.tensor(min(loss, 20.0))))
        label = "final validation" if final else "validation"
        self.print(
            f"{label} loss at iteration {iteration} | lm loss value: {loss:.6E} | "
            f"lm loss PPL: {ppl:.6E} |"
        )
        if _is_logging_rank():
            self._write(iteration, {"valid_lm_loss": loss})


def _kl_field(spec: PhaseSpec, loss_kl: float | None) -> list[str]:
    """The log line's KL form of a multi-hot loss (MCE - target entropy, floor 0)."""
    if spec.target_width == 1:
        return []
    return [f"lm loss KL (MCE - target entropy): {'n/a' if loss_kl is None else f'{loss_kl:.6E}'}"]


def _fmt(value) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def _num(value) -> float | None:
    """A JSON-safe float: None for a missing or non-finite value."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None
