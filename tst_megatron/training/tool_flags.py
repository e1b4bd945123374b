"""The flags of the tools that start from a checkpoint, up to their settings.

`tools/convert_checkpoint.py` and `tools/evaluate.py` parse ``pretrain_tst.py``'s flags
(`parse_run_args`, the YAML file as defaults), then, before validation, take every model and
data setting the command line and ``--yaml-config`` did not give from the checkpoint's
``settings`` record (`apply_recorded_settings`, Megatron-LM's ``--use-checkpoint-args``); a
given model flag that differs from the record is refused. A checkpoint without the record needs
the flags, as before. The converter then resolves them for one CPU process
(`single_process_settings`). With `training/arguments.py` and `training/run_config.py`, the
only module that reads the flags' namespace: the library takes the resolved sections.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tst_megatron.data.tokenizer import (
    Tokenizer,
    TokenizerSpec,
    build_training_tokenizer,
    model_vocab_size,
)
from tst_megatron.settings import Environment, RunConfig
from tst_megatron.training.arguments import load_yaml_defaults
from tst_megatron.training.checkpoint_files import CheckpointError
from tst_megatron.training.checkpoint_settings import (
    MODEL,
    SETTINGS,
    TOKENIZER,
    flag,
    plain,
    same,
)
from tst_megatron.training.run_config import resolve

# The model as one process builds it, whatever layout and implementation the run used.
SINGLE_PROCESS = {
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1,
    "num_layers_per_virtual_pipeline_stage": None,
    "context_parallel_size": 1,
    "expert_model_parallel_size": 1,
    "expert_tensor_parallel_size": None,
    "sequence_parallel": False,
    "use_distributed_optimizer": False,
    "overlap_grad_reduce": False,
    "overlap_param_gather": False,
    "transformer_impl": "local",
    "use_cpu_initialization": True,  # the weights stay in host memory, also on a GPU machine
    "moe_grouped_gemm": False,
    "moe_token_dispatcher_type": "allgather",  # alltoall's constructor needs CUDA streams
    "fp8": None,
    "fp8_param_gather": False,
    "recompute_granularity": None,
    "recompute_method": None,
    "recompute_num_layers": None,
    "recompute_activations": False,
    "recompute_modules": None,
    "moe_permute_fusion": None,  # needs Transformer Engine on a GPU
    "distributed_backend": "gloo",
    # no data is read and nothing is logged
    "mock_data": True,
    "data_path": None,
    "train_data_path": None,
    "valid_data_path": None,
    "test_data_path": None,
    "tensorboard_dir": None,
    "wandb_project": None,
    "metrics_jsonl": None,
}
# Training settings a conversion does not use, reset so that only the model flags matter.
PLACEHOLDERS = {
    "micro_batch_size": 1, "global_batch_size": None, "rampup_batch_size": None,
    "train_iters": 1, "lr": 0.0, "min_lr": 0.0, "lr_decay_style": "constant",
    "lr_decay_iters": None, "lr_warmup_iters": 0, "lr_warmup_fraction": None,
    "lr_wsd_decay_iters": None, "weight_decay_incr_style": "constant",
    "start_weight_decay": None, "end_weight_decay": None, "save_interval": None,
    "exit_interval": None, "exit_duration_in_mins": None, "tst_bag_size": 1,
    "tst_phase1_fraction": None, "tst_phase1_iters": None, "tst_phase": "auto",
}  # fmt: skip


def apply_recorded_settings(
    args: argparse.Namespace, explicit: set[str], meta: dict, path: str
) -> list[str]:
    """For a tool: take the model and data settings not in ``explicit`` (the destinations
    given on the command line or in ``--yaml-config``) from checkpoint ``path``'s record into
    the parsed, not yet validated ``args``.

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
        f"{flag(dest)}: checkpoint {saved[dest]!r}, given {plain(getattr(args, dest))!r}"
        for dest in MODEL
        if dest in explicit and dest in saved and not same(saved[dest], getattr(args, dest))
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


def given_destinations(
    parser: argparse.ArgumentParser, argv: list[str], yaml_values: dict[str, Any]
) -> set[str]:
    """The argparse destinations ``argv`` or the ``--yaml-config`` file set explicitly."""
    unset = object()
    probe = argparse.Namespace(**{action.dest: unset for action in parser._actions})
    parsed, _ = parser.parse_known_args(argv, probe)
    return {dest for dest, value in vars(parsed).items() if value is not unset} | set(yaml_values)


def parse_run_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``argv`` parsed by ``parser`` (``build_parser()`` plus a tool's own flags), with the
    ``--yaml-config`` file's values as defaults, as ``pretrain_tst.py`` reads them.

    ``args.given_settings`` holds the destinations that ``argv`` or the YAML file set (the
    others may come from a checkpoint's record: `apply_recorded_settings`).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    config = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    config.add_argument("--yaml-config", "--config", dest="yaml_config", default=None)
    yaml_path = config.parse_known_args(argv)[0].yaml_config
    yaml_values = load_yaml_defaults(parser, yaml_path) if yaml_path is not None else {}
    parser.set_defaults(**yaml_values)
    args = parser.parse_args(argv)
    args.given_settings = given_destinations(parser, argv, yaml_values)
    return args


def single_process_settings(run_args: argparse.Namespace) -> tuple[RunConfig, Tokenizer]:
    """The settings of the run's model as one CPU process builds it, and its tokenizer.

    The training flags a conversion does not use are reset (``PLACEHOLDERS``), the layout and
    implementation are one process's (``SINGLE_PROCESS``); the padded vocabulary is the run's
    (it depends on the run's tensor-parallel size). ``--seq-length`` defaults to
    ``--max-position-embeddings``.

    Raises:
        ConfigError, SettingsError, TokenizerError: the flags are invalid or name an unusable
            tokenizer.
    """
    args = argparse.Namespace(**vars(run_args))
    divisible_by = args.make_vocab_size_divisible_by
    tensor_parallel = args.tensor_model_parallel_size
    vars(args).update(SINGLE_PROCESS)
    vars(args).update(PLACEHOLDERS)
    if args.seq_length is None:  # the sequence length is no part of the weights
        args.seq_length = args.max_position_embeddings
    run = resolve(args, 1, Environment.cpu())
    vocab_size = run.model.vocab_size
    tokenizer = build_training_tokenizer(TokenizerSpec.from_settings(run.data, vocab_size))
    padded = model_vocab_size(tokenizer, vocab_size, divisible_by, tensor_parallel)
    return run.with_padded_vocab_size(padded), tokenizer
