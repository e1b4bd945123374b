"""The settings a checkpoint records (``tst_checkpoint.json``'s ``settings``), and their checks.

Every setting that changes a run's numbers is recorded, in four sections:

* ``model``: architecture, rotary base, norm epsilon, activation, dropout, MoE routing,
  precision (and ``init_method_std``, which only the first step and a conversion use);
* ``data``: the tokenizer and sequence length a tool needs to rebuild the vocabulary and
  the samples (not compared on resume: the data checks cover a tokenizer that does not fit);
* ``optimizer``: the optimizer, its betas and epsilon, clipping, the loss scaler;
* ``schedule``: the learning-rate and weight-decay schedules and the batch size they count in.

A resume (`check_resume_settings`) refuses any difference with one line naming each setting's
flag, the checkpoint's and this run's value, and the flag that allows it: ``--finetune`` for
the model (a new run from the weights), ``--no-load-optim`` for the optimizer (its state
restarts with this run's settings; torch restores the saved betas and epsilon otherwise),
and Megatron-LM's ``--override-opt_param-scheduler`` (this run's schedule) or
``--use-checkpoint-opt_param-scheduler`` (the checkpoint's) for the schedule. The tools
(`apply_recorded_settings`) take the model and data settings they are not given from
the record, as Megatron-LM's ``--use-checkpoint-args``, and refuse given ones that differ.
Checkpoints without the record load with the flags as before.
"""

from __future__ import annotations

import json
import math
import os
from argparse import Namespace
from typing import Any

from tst_megatron.training.checkpoint_files import CheckpointError

SETTINGS = "settings"
MODEL = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "max_position_embeddings", "position_embedding_type", "rotary_base",
    "rotary_percent", "normalization", "norm_epsilon", "apply_layernorm_1p", "swiglu",
    "untie_embeddings_and_output_weights", "add_bias_linear", "qk_layernorm",
    "hidden_dropout", "attention_dropout", "attention_softmax_in_fp32", "bf16", "fp16",
    "num_experts", "moe_router_topk", "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size", "moe_aux_loss_coeff",
    "moe_router_load_balancing_type", "moe_layer_freq", "moe_router_score_function",
    "moe_router_pre_softmax", "moe_z_loss_coeff", "moe_router_topk_scaling_factor",
    "moe_router_num_groups", "moe_router_group_topk", "moe_router_enable_expert_bias",
    "moe_router_bias_update_rate", "moe_router_dtype", "moe_expert_capacity_factor",
    "moe_token_drop_policy", "moe_pad_expert_input_to_capacity", "calculate_per_token_loss",
    "init_method_std",
)  # fmt: skip
INITIALIZATION_ONLY = ("init_method_std",)  # no effect once weights are loaded
DATA = (
    "tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size",
    "make_vocab_size_divisible_by", "seq_length",
)  # fmt: skip
OPTIMIZER = (
    "optimizer", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad", "loss_scale",
    "initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis",
)  # fmt: skip
SCHEDULE = (
    "lr", "min_lr", "lr_decay_style", "lr_decay_iters", "lr_warmup_iters", "lr_warmup_init",
    "lr_wsd_decay_style", "lr_wsd_decay_iters", "weight_decay", "start_weight_decay",
    "end_weight_decay", "weight_decay_incr_style", "global_batch_size", "rampup_batch_size",
)  # fmt: skip  (train_iters: `checkpointing.check_schedule`, with the TST schedule)
SECTIONS = {"model": MODEL, "data": DATA, "optimizer": OPTIMIZER, "schedule": SCHEDULE}
PATHS = ("tokenizer_model", "vocab_file", "merge_file")
TOKENIZER = ("tokenizer_type", *PATHS)  # one tokenizer: given flags replace all of them
FLAG_NAMES = {
    "override_opt_param_scheduler": "--override-opt_param-scheduler",
    "use_checkpoint_opt_param_scheduler": "--use-checkpoint-opt_param-scheduler",
}


def flag(dest: str) -> str:
    """The command-line flag of argparse destination ``dest``."""
    return FLAG_NAMES.get(dest, "--" + dest.replace("_", "-"))


def _plain(value: Any) -> Any:
    """``value`` as the JSON record holds it (tuples become lists)."""
    return json.loads(json.dumps(value))


def recorded_settings(args: Namespace) -> dict[str, dict[str, Any]]:
    """The ``settings`` entry of a checkpoint written by a run with (validated) ``args``."""
    record = {}
    for section, dests in SECTIONS.items():
        values = {dest: _plain(getattr(args, dest, None)) for dest in dests}
        for dest in PATHS:
            if section == "data" and values[dest] and os.path.exists(values[dest]):
                values[dest] = os.path.abspath(values[dest])
        record[section] = values
    return record


def _scalar(value: Any) -> Any:
    """A one-entry list as its entry (flags that take one value per layer or a scalar)."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def _same(saved: Any, now: Any) -> bool:
    saved, now = _scalar(_plain(saved)), _scalar(_plain(now))
    if isinstance(saved, float) and isinstance(now, float) and math.isnan(saved):
        return math.isnan(now)
    return saved == now


def _differences(args: Namespace, saved: dict, dests: tuple[str, ...]) -> list[str]:
    return [
        f"{flag(dest)}: checkpoint {saved[dest]!r}, this run {_plain(getattr(args, dest, None))!r}"
        for dest in dests
        if dest in saved and not _same(saved[dest], getattr(args, dest, None))
    ]


def check_resume_settings(args: Namespace, meta: dict, path: str) -> list[str]:
    """Refuse a resume whose model, optimizer or schedule settings differ from the record.

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
    compared = tuple(d for d in MODEL if d not in INITIALIZATION_ONLY)
    diffs = _differences(args, record.get("model", {}), compared)
    if diffs and not args.finetune:
        raise CheckpointError(
            f"checkpoint {path} was trained with other model settings than this run's: "
            + "; ".join(diffs)
            + ". Resume with the checkpoint's values, or pass --finetune to start a new run "
            "from its weights with this run's settings"
        )
    if diffs:
        notes.append("this run's model settings replace the checkpoint's (--finetune): "
                     + "; ".join(diffs))
    if getattr(args, "evaluation_only", False) or args.finetune:
        return notes
    diffs = _differences(args, record.get("optimizer", {}), OPTIMIZER)
    if diffs and not args.no_load_optim:
        raise CheckpointError(
            f"checkpoint {path} was trained with other optimizer settings than this run's: "
            + "; ".join(diffs)
            + ". Resume with the checkpoint's values, or pass --no-load-optim to restart the "
            "optimizer state with this run's settings"
        )
    if diffs:
        notes.append("this run's optimizer settings apply (--no-load-optim): " + "; ".join(diffs))
    diffs = _differences(args, record.get("schedule", {}), SCHEDULE)
    override = getattr(args, "override_opt_param_scheduler", False)
    use_saved = getattr(args, "use_checkpoint_opt_param_scheduler", False)
    if diffs and args.no_load_optim:
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


def apply_recorded_settings(
    args: Namespace, explicit: set[str], meta: dict, path: str
) -> list[str]:
    """For a tool: take the model and data settings not in ``explicit`` (the destinations
    given on the command line or in ``--yaml-config``) from checkpoint ``path``'s record.

    Returns the destinations taken from the record (empty for a checkpoint without one).

    Raises:
        CheckpointError: a given model setting differs from the record: one line naming each,
            both values, and that leaving the flag out takes the checkpoint's.
    """
    record = meta.get(SETTINGS)
    if not isinstance(record, dict):
        return []
    saved = {**record.get("data", {}), **record.get("model", {})}
    diffs = [
        f"{flag(dest)}: checkpoint {saved[dest]!r}, given {_plain(getattr(args, dest))!r}"
        for dest in MODEL
        if dest in explicit and dest in saved and not _same(saved[dest], getattr(args, dest))
    ]
    if diffs:
        raise CheckpointError(
            f"the model flags given differ from checkpoint {path}'s record: "
            + "; ".join(diffs)
            + ". Leave these flags out to take the checkpoint's values"
        )
    own_tokenizer = any(dest in explicit for dest in TOKENIZER)
    taken = [
        dest for dest in saved
        if dest not in explicit and not (own_tokenizer and dest in TOKENIZER)
    ]  # fmt: skip
    for dest in taken:
        setattr(args, dest, saved[dest])
    return taken


def given_destinations(parser, argv: list[str], yaml_values: dict[str, Any]) -> set[str]:
    """The argparse destinations ``argv`` or the ``--yaml-config`` file set explicitly."""
    unset = object()
    probe = Namespace(**{action.dest: unset for action in parser._actions})
    parsed, _ = parser.parse_known_args(argv, probe)
    return {dest for dest, value in vars(parsed).items() if value is not unset} | set(yaml_values)
