"""Validation loss and perplexity of a ``pretrain_tst.py`` checkpoint, at any parallel layout.

Launch like ``pretrain_tst.py``, at any layout; the model settings come from the
checkpoint's record (``tst_checkpoint.json``, as Megatron-LM's ``--use-checkpoint-args``):
model flags or ``--yaml-config`` given anyway are checked against it, and a checkpoint
written before the record needs them::

    torchrun --nproc-per-node 2 tools/evaluate.py --tensor-model-parallel-size 2 \
        --load CKPT --valid-data-path PREFIX --eval-iters 50 --micro-batch-size 4 [--json]

Data: ``--valid-data-path PREFIX`` draws the samples from that whole ``.bin/.idx`` dataset
(it replaces a ``--data-path`` of the YAML config); ``--data-path`` from its validation split
(``--split``), as in training; ``--mock-data`` the synthetic validation windows. Each
data-parallel rank reads ``--eval-iters`` micro-batches of ``--micro-batch-size`` samples of
``--seq-length`` + 1 tokens (Megatron's `GPTDataset` order; past one epoch it wraps around).
The loss is the standard next-token cross-entropy of the trainer's validation (TST phase 2
view, whatever phase the checkpoint is from). The last rank prints a Megatron-style line::

    validation loss at iteration 1000 | lm loss value: 3.2E+00 | lm loss PPL: 2.5E+01 |

and, with ``--json``, one JSON line ``{"iteration", "lm_loss", "ppl", "samples", "tokens",
"checkpoint"}``. Only the model and the validation samples are built, and only the weights
loaded (`tst_megatron.training.evaluator.Evaluator`: no optimizer, no training samples).

Exit status: 0 on success, 1 for an unusable checkpoint or dataset, 2 for bad flags.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tst_megatron.settings import Environment, RunConfig, SettingsError  # noqa: E402
from tst_megatron.training.arguments import ConfigError, build_parser  # noqa: E402
from tst_megatron.training.placement import launch_error  # noqa: E402
from tst_megatron.training.run_config import resolve  # noqa: E402

# Training settings that evaluation does not use but validation requires.
PLACEHOLDERS = {"train_iters": 1, "lr": 0.0}


def parse(argv: list[str] | None):
    """The flags plus ``--json`` (not validated: the checkpoint's record may add settings)."""
    from tst_megatron.training.tool_flags import parse_run_args

    parser = build_parser()
    parser.prog = "evaluate.py"
    parser.add_argument_group("evaluation").add_argument(
        "--json", action="store_true", help="Also print the result as one JSON line."
    )
    args = parse_run_args(parser, argv)
    if args.load is None:
        raise ConfigError("give --load, the checkpoint to evaluate")
    return args


def adjust(args) -> RunConfig:
    """The settings of ``args`` adjusted for a weights-only evaluation (validated).

    Raises:
        ConfigError: the flags as adjusted are invalid, or the launch cannot run them.
    """
    for key, value in PLACEHOLDERS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.valid_data_path:  # it replaces the run's --data-path / --mock-data (e.g. from YAML)
        args.data_path, args.mock_data = None, False
        args.train_data_path = args.train_data_path or args.valid_data_path  # validation wants one
    vars(args).update(
        no_load_optim=True, no_load_rng=True, finetune=False, allow_fresh_start=False,
        save=None, tensorboard_dir=None, wandb_project=None,
        metrics_jsonl=None, global_batch_size=None, rampup_batch_size=None,
        override_opt_param_scheduler=False, use_checkpoint_opt_param_scheduler=False,
        tst_allow_schedule_change=False,
    )  # fmt: skip
    env = Environment.detect()
    try:
        run = resolve(args, int(os.environ.get("WORLD_SIZE", "1")), env)
    except SettingsError as err:
        raise ConfigError(str(err)) from err
    error = launch_error(run.parallel, env, os.environ)
    if error:
        raise ConfigError(error)
    if args.eval_iters < 1:
        raise ConfigError(f"--eval-iters must be >= 1, got {args.eval_iters}")
    pp = args.pipeline_model_parallel_size
    if args.virtual_pipeline_model_parallel_size and args.eval_iters < pp:
        raise ConfigError(
            f"the interleaved pipeline schedule needs at least --pipeline-model-parallel-size "
            f"{pp} micro-batches: --eval-iters {args.eval_iters} is too small"
        )
    return run


def checkpoint_of(args) -> str:
    """The checkpoint ``--load`` names; its record's model settings fill the flags not given.

    Raises:
        CheckpointError: no checkpoint there, or a given model flag differs from the record.
    """
    from tst_megatron.training.checkpointing import (
        TRACKER,
        CheckpointError,
        find_checkpoint,
        read_checkpoint_meta,
    )
    from tst_megatron.training.tool_flags import apply_recorded_settings

    path = find_checkpoint(args.load)
    if path is None:
        raise CheckpointError(
            f"--load {args.load}: no checkpoint there (no {TRACKER} and no "
            "tst_checkpoint.json): point --load at a save directory or at one of its "
            "iter_XXXXXXX directories"
        )
    apply_recorded_settings(args, args.given_settings, read_checkpoint_meta(path), path)
    return path


def main(argv: list[str] | None = None) -> int:
    from tst_megatron.training.parent_death import end_with_launcher

    end_with_launcher()
    try:
        args = parse(argv)
    except ConfigError as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2

    from tst_megatron.training.checkpointing import CheckpointError

    try:  # before any expensive work
        path = checkpoint_of(args)
    except CheckpointError as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr, flush=True)
        return 1
    try:
        run = adjust(args)
    except ConfigError as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2

    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:  # no launcher: one rank
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        for key, value in defaults.items():
            os.environ.setdefault(key, value)

    import torch
    from megatron.core import parallel_state

    from tst_megatron.data.checks import DataError
    from tst_megatron.data.tokenizer import TokenizerError
    from tst_megatron.training.evaluator import Evaluator
    from tst_megatron.training.loop import initialize_distributed, shutdown_distributed

    initialize_distributed(run.parallel, run.batch, run.reliability, run.schedule.seed)
    code = 0
    try:
        evaluator = Evaluator(run)
        iteration = evaluator.load(path)
        loss = evaluator.evaluate()
        if loss is None:
            raise DataError(
                "no validation samples: give --valid-data-path, or a --data-path whose --split "
                "has a validation share"
            )
        evaluator.metrics.validation(iteration, loss)
        last = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
        if args.json and last:
            dp_size = parallel_state.get_data_parallel_world_size()
            samples = args.eval_iters * args.micro_batch_size * dp_size
            print(json.dumps({
                "iteration": iteration,
                "lm_loss": loss,
                "ppl": math.exp(min(loss, 20.0)),
                "samples": samples,
                "tokens": samples * args.seq_length,
                "checkpoint": args.load,
            }), flush=True)  # fmt: skip
    except (DataError, CheckpointError, TokenizerError) as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr, flush=True)
        code = 1
    finally:
        shutdown_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main())
