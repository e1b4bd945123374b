"""The settings a checkpoint records (``tst_checkpoint.json``'s ``settings``), and their checks.

Every setting that changes a run's numbers is recorded, in four sections:

* ``model``: every field of the model section (`MODEL_FIELDS`: architecture, rotary base,
  norm epsilon, activation, dropout, MoE routing, ``init_method_std``, which only the first
  step and a conversion use) but `NOT_IN_SETTINGS` and those recorded under ``data``, and
  the precision settings that change what it computes (`NUMERICS`);
* ``data``: the tokenizer and sequence length a tool needs to rebuild the vocabulary and
  the samples (not compared on resume: the data checks cover a tokenizer that does not fit);
* ``optimizer``: the optimizer, its betas and epsilon, clipping, the loss scaler;
* ``schedule``: the learning-rate and weight-decay schedules and the batch size they count in.

A resume (`check_resume_settings`) refuses any difference with one line naming each setting's
flag, the checkpoint's and this run's value, and the flag that allows it: ``--finetune`` for
the model (a new run from the weights), ``--no-load-optim`` for the optimizer (its state
restarts with this run's settings; torch restores the saved betas and epsilon otherwise),
and Megatron-LM's ``--override-opt_param-scheduler`` (this run's schedule) or
``--use-checkpoint-opt_param-scheduler`` (the checkpoint's) for the schedule. The tools take
the model and data settings they are not given from the record, as Megatron-LM's
``--use-checkpoint-args``, and refuse given ones that differ (`tool_flags`).
Checkpoints without the record load with the flags as before.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from typing import Any

from tst_megatron.config import TSTConfig
from tst_megatron.settings import (
    BatchConfig,
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    ScheduleConfig,
)
from tst_megatron.settings.model import MoEConfig
from tst_megatron.training.checkpoint_files import CheckpointError

SETTINGS = "settings"
MODEL_FIELDS = tuple(
    f.name for section in (ModelConfig, MoEConfig) for f in fields(section) if f.name != "moe"
)
"""Every field of the model section, by its flag's name (`ModelConfig.flat`)."""
DATA = (
    "tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size",
    "make_vocab_size_divisible_by", "seq_length",
)  # fmt: skip
NOT_IN_SETTINGS = {
    "padded_vocab_size": "no flag: derived from the vocabulary and the tensor-parallel size; "
    "the record's model shape (``model``, `checkpointing.model_shape`) holds it",
    "moe_token_dispatcher_type": "how tokens travel to the expert-parallel ranks, not what the "
    "model computes: a resume, an evaluation or a conversion may use another",
}
"""Model fields the ``settings`` record leaves out, and why."""
NUMERICS = ("attention_softmax_in_fp32", "bf16", "fp16", "calculate_per_token_loss")
"""Settings of other sections that change what the model computes, recorded with it."""
MODEL = (
    *(name for name in MODEL_FIELDS if name not in DATA and name not in NOT_IN_SETTINGS),
    *NUMERICS,
)
INITIALIZATION_ONLY = ("init_method_std",)  # no effect once weights are loaded
LOSS_SCALE = (
    "loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis",
)  # fmt: skip
WEIGHT_DECAY = ("weight_decay", "start_weight_decay", "end_weight_decay", "weight_decay_incr_style")
LR = (
    "lr", "min_lr", "lr_decay_style", "lr_decay_iters", "lr_warmup_iters", "lr_warmup_init",
    "lr_wsd_decay_style", "lr_wsd_decay_iters",
)  # fmt: skip
OPTIMIZER = ("optimizer", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad", *LOSS_SCALE)
# train_iters: `checkpointing.check_schedule`, with the TST schedule
SCHEDULE = (*LR, *WEIGHT_DECAY, "global_batch_size", "rampup_batch_size")
SECTIONS = {"model": MODEL, "data": DATA, "optimizer": OPTIMIZER, "schedule": SCHEDULE}
PATHS = ("tokenizer_model", "vocab_file", "merge_file")
TOKENIZER = ("tokenizer_type", *PATHS)  # one tokenizer: given flags replace all of them
FLAG_NAMES = {
    "override_opt_param_scheduler": "--override-opt_param-scheduler",
    "use_checkpoint_opt_param_scheduler": "--use-checkpoint-opt_param-scheduler",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointedRun:
    """The sections of a run that its checkpoints record and a resume is checked against:
    `RunConfig` less the machine (environment, kernels), recomputation, logging, reliability
    and the checkpoint section itself."""

    model: ModelConfig
    parallel: ParallelConfig
    precision: PrecisionConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    batch: BatchConfig
    data: DataConfig
    tst: TSTConfig

    @classmethod
    def of(cls, run: RunConfig) -> CheckpointedRun:
        """The checkpointed sections of ``run`` (for the entry points, which hold it)."""
        return cls(**{f.name: getattr(run, f.name) for f in fields(cls)})

    def values(self) -> dict[str, Any]:
        """This run's value of every recorded setting, by its flag's name (a dense model has
        no MoE setting but ``num_experts`` None)."""
        precision, batch = self.precision, self.batch
        return {
            **self.model.flat(),
            **_take(self.data, TOKENIZER),
            "attention_softmax_in_fp32": precision.attention_softmax_in_fp32,
            "bf16": precision.params_dtype == "bf16",
            "fp16": precision.params_dtype == "fp16",
            "calculate_per_token_loss": batch.calculate_per_token_loss,
            **_take(self.optimizer, (*OPTIMIZER[:5], *WEIGHT_DECAY)),
            **_take(precision, LOSS_SCALE),
            **_take(self.schedule, LR),
            "global_batch_size": batch.global_batch_size,
            "rampup_batch_size": batch.rampup_batch_size,
        }


def _take(section: object, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(section, name) for name in names}


def flag(dest: str) -> str:
    """The command-line flag of argparse destination ``dest``."""
    return FLAG_NAMES.get(dest, "--" + dest.replace("_", "-"))


def plain(value: Any) -> Any:
    """``value`` as the JSON record holds it (tuples become lists)."""
    return json.loads(json.dumps(value))


def recorded_settings(run: CheckpointedRun) -> dict[str, dict[str, Any]]:
    """The ``settings`` entry of a checkpoint written by ``run``."""
    now = run.values()
    record = {}
    for section, dests in SECTIONS.items():
        values = {dest: plain(now[dest]) for dest in dests if dest in now}
        for dest in PATHS:
            if section == "data" and values[dest] and os.path.exists(values[dest]):
                values[dest] = os.path.abspath(values[dest])
        record[section] = values
    return record


def _scalar(value: Any) -> Any:
    """A one-entry list as its entry (flags that take one value per layer or a scalar)."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def same(saved: Any, now: Any) -> bool:
    """Whether a recorded value and this run's are equal (as JSON; NaN equals NaN)."""
    saved, now = _scalar(plain(saved)), _scalar(plain(now))
    if isinstance(saved, float) and isinstance(now, float) and math.isnan(saved):
        return math.isnan(now)
    return saved == now


def _differences(now: dict[str, Any], saved: dict, dests: tuple[str, ...]) -> list[str]:
    """Settings both record and this run have that differ (a dense model has no MoE ones)."""
    return [
        f"{flag(dest)}: checkpoint {saved[dest]!r}, this run {plain(now[dest])!r}"
        for dest in dests
        if dest in saved and dest in now and not same(saved[dest], now[dest])
    ]


def check_resume_settings(
    run: CheckpointedRun,
    checkpoint: CheckpointConfig,
    meta: dict,
    path: str,
    evaluation_only: bool = False,
) -> list[str]:
    """Refuse a resume whose model, optimizer or schedule settings differ from the record
    (``evaluation_only``: the model's alone, as `tools/evaluate.py` loads the weights only).

    Returns notes for the log where a flag allowed a difference. A checkpoint without the
    record passes (it predates it).

    Raises:
        CheckpointError: one line naming each differing setting, both values, and the flag
            that allows the difference.
    """
    record = meta.get(SETTINGS)
    if not isinstance(record, dict):
        return []
    notes = []
    now = run.values()
    compared = tuple(d for d in MODEL if d not in INITIALIZATION_ONLY)
    diffs = _differences(now, record.get("model", {}), compared)
    if diffs and not checkpoint.finetune:
        raise CheckpointError(
            f"checkpoint {path} was trained with other model settings than this run's: "
            + "; ".join(diffs)
            + ". Resume with the checkpoint's values, or pass --finetune to start a new run "
            "from its weights with this run's settings"
        )
    if diffs:
        notes.append(
            "this run's model settings replace the checkpoint's (--finetune): " + "; ".join(diffs)
        )
    if evaluation_only or checkpoint.finetune:
        return notes
    diffs = _differences(now, record.get("optimizer", {}), OPTIMIZER)
    if diffs and not checkpoint.no_load_optim:
        raise CheckpointError(
            f"checkpoint {path} was trained with other optimizer settings than this run's: "
            + "; ".join(diffs)
            + ". Resume with the checkpoint's values, or pass --no-load-optim to restart the "
            "optimizer state with this run's settings"
        )
    if diffs:
        notes.append("this run's optimizer settings apply (--no-load-optim): " + "; ".join(diffs))
    diffs = _differences(now, record.get("schedule", {}), SCHEDULE)
    override = checkpoint.override_opt_param_scheduler
    use_saved = checkpoint.use_checkpoint_opt_param_scheduler
    if diffs and checkpoint.no_load_optim:
        notes.append("this run's schedule applies (--no-load-optim): " + "; ".join(diffs))
    elif diffs and not (override or use_saved):
        raise CheckpointError(
            f"checkpoint {path} was trained with another learning-rate / weight-decay schedule "
            "than this run's: " + "; ".join(diffs) + ". Resume with the checkpoint's values, "
            "or pass --override-opt_param-scheduler to continue with this run's schedule or "
            "--use-checkpoint-opt_param-scheduler to continue with the checkpoint's"
        )
    elif diffs:
        which = (
            "this run's schedule applies (--override-opt_param-scheduler)"
            if override
            else "the checkpoint's schedule continues (--use-checkpoint-opt_param-scheduler); "
            "ignored"
        )
        notes.append(f"{which}: " + "; ".join(diffs))
    return notes
