"""Megatron side of a conversion: run flags, loading any saved layout in one process, saving.

A `torch_dist` checkpoint written at any TP/PP/EP (and virtual pipeline) layout loads into the
whole model built at TP=PP=EP=1 in a single process: `dist_checkpointing` reshards by the
global keys of the sharded tensors. The model is built with the local (non-TE) spec, whose
sharded keys match the TE spec's, and with per-expert MLPs, whose sharded keys match grouped
GEMM's, so checkpoints of either implementation load. Nothing here needs a GPU or a launcher;
the weights stay in host memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from argparse import Namespace
from typing import Any

import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from tst_megatron.conversion import ConversionError
from tst_megatron.data.tokenizer import build_training_tokenizer, model_vocab_size
from tst_megatron.model import TSTGPTModel
from tst_megatron.settings import ModelConfig
from tst_megatron.training import checkpointing as ckpt
from tst_megatron.training.arguments import load_yaml_defaults, tokenizer_spec, validate_args
from tst_megatron.training.checkpoint_settings import CheckpointedRun, flag
from tst_megatron.training.model_builder import (
    build_model,
    single_process_parallel_state,
    transformer_config,
)
from tst_megatron.training.recorded_flags import apply_recorded_settings, given_destinations
from tst_megatron.training.run_config import from_validated_args

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


def parse_run_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> Namespace:
    """``argv`` parsed by ``parser`` (``build_parser()`` plus a tool's own flags), with the
    ``--yaml-config`` file's values as defaults, as ``pretrain_tst.py`` reads them.

    ``args.given_settings`` holds the destinations that ``argv`` or the YAML file set (the
    others may come from a checkpoint's record: `apply_checkpoint_settings`).
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


def apply_checkpoint_settings(args: Namespace, path: str, meta: dict) -> list[str]:
    """Model and tokenizer settings not given (`parse_run_args`) from checkpoint ``path``'s
    record; given ones are checked against it. Returns the flags taken from the record.

    Raises:
        ConversionError: a given model flag differs from the record (naming both values).
    """
    try:
        taken = apply_recorded_settings(args, args.given_settings, meta, path)
    except ckpt.CheckpointError as err:
        raise ConversionError(str(err)) from None
    return [flag(dest) for dest in taken]


def single_process_args(run_args: Namespace) -> tuple[Namespace, Any]:
    """Validated arguments of the run's model as one process builds it, and its tokenizer.

    The padded vocabulary is the run's (it depends on the run's tensor-parallel size).
    ``--seq-length`` defaults to ``--max-position-embeddings``.

    Returns:
        ``(args, tokenizer)``.

    Raises:
        ConfigError, TokenizerError: the flags are invalid or name an unusable tokenizer.
    """
    args = Namespace(**vars(run_args))
    padding = Namespace(
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        vocab_size=args.vocab_size,
    )
    vars(args).update(SINGLE_PROCESS)
    vars(args).update(PLACEHOLDERS)
    if args.seq_length is None:  # the sequence length is no part of the weights
        args.seq_length = args.max_position_embeddings
    validate_args(args, 1)
    tokenizer = build_training_tokenizer(tokenizer_spec(args))
    args.padded_vocab_size = model_vocab_size(
        tokenizer,
        padding.vocab_size,
        padding.make_vocab_size_divisible_by,
        padding.tensor_model_parallel_size,
    )
    return args, tokenizer


def find_checkpoint(load: str) -> tuple[str, dict]:
    """The published checkpoint under ``load`` (save dir or ``iter_`` dir) and its metadata.

    Raises:
        ConversionError: no tracker and no ``tst_checkpoint.json``, a tracker pointing at a
            missing or unpublished iteration, or unreadable metadata.
    """
    if not os.path.isdir(load):
        raise ConversionError(f"--load {load}: no such directory")
    try:
        path = ckpt.find_checkpoint(load)
    except ckpt.CheckpointError as err:
        raise ConversionError(str(err)) from None
    if path is None:
        raise ConversionError(
            f"--load {load}: no checkpoint there (neither {ckpt.TRACKER} nor {ckpt.META}); an "
            f"iter_ directory without {ckpt.META} is partial (its save did not finish)"
        )
    try:
        return path, ckpt.read_checkpoint_meta(path)
    except ckpt.CheckpointError as err:
        raise ConversionError(str(err)) from None


def check_model_shape(model: ModelConfig, meta: dict, path: str) -> None:
    """``model`` must be the checkpoint's (``tst_checkpoint.json``'s ``model`` shape).

    The padded vocabulary is not compared (it depends on the run's TP size, which the flags
    need not repeat): the caller takes the checkpoint's. The routing keys of a dense model
    are not compared (it has no router).
    """
    diffs = [
        f"{key}: checkpoint {saved!r}, flags {now!r}"
        for key, saved, now in ckpt.shape_differences(meta["model"], model)
        if key != "padded_vocab_size"
    ]
    if diffs:
        raise ConversionError(
            f"the model flags describe another model than checkpoint {path} ("
            + "; ".join(diffs)
            + "): pass the model flags or --yaml-config the run used"
        )


def stored_dtype(path: str) -> torch.dtype:
    """The dtype checkpoint ``path`` stores its weights in (the run's parameter dtype)."""
    try:
        metadata = dist_checkpointing.load_tensors_metadata(path)
    except (Exception, CheckpointException) as err:  # CheckpointException: BaseException
        raise ConversionError(ckpt.describe_load_failure(err, path)) from None
    return metadata["embedding.word_embeddings.weight"].dtype


def load_model(args: Namespace, path: str) -> TSTGPTModel:
    """The whole model of checkpoint ``path``, in one process (TP=PP=1 parallel state active).

    Only the weights are read (not the optimizer); ``_extra_state`` entries are skipped.
    The files are first checked against the sizes and CRC32s ``tst_checkpoint.json`` records.
    """
    try:
        ckpt.verify_files(path, ckpt.recorded_files(ckpt.read_checkpoint_meta(path), path))
    except ckpt.CheckpointError as err:
        raise ConversionError(str(err)) from None
    model = _build(args)
    sharded = {
        key: value
        for key, value in model.sharded_state_dict().items()
        if not key.endswith("._extra_state")
    }
    try:
        loaded = dist_checkpointing.load({"model": sharded}, path)
    except (Exception, CheckpointException) as err:  # CheckpointException: BaseException
        raise ConversionError(ckpt.describe_load_failure(err, path)) from None
    _load_strict(model, loaded["model"])
    return model


def save_model_checkpoint(args: Namespace, state: dict[str, torch.Tensor], save: str) -> str | None:
    """Write Megatron ``state`` as ``save/iter_0000000`` (phase 2) with tracker and metadata.

    ``pretrain_tst.py --load save --finetune`` (any layout) continues from it. Without CUDA
    this installs the CPU shim (`dist_checkpointing.save` synchronises CUDA), as
    ``pretrain_tst.py`` does.
    """
    if not torch.cuda.is_available():
        from tst_megatron.cpu.shim import install_cpu_shim

        install_cpu_shim()
    settings = from_validated_args(args)
    checkpoints = ckpt.Checkpointer(dataclasses.replace(settings.checkpoint, save=save))
    with single_process_parallel_state():
        model = _build(args)
        _load_strict(model, state)
        return checkpoints.save(
            CheckpointedRun.of(settings), [model], None, None, ckpt.TrainingProgress(0, 0, 2, {})
        )


def _build(args: Namespace) -> TSTGPTModel:
    settings = from_validated_args(args)
    config = transformer_config(
        settings.model,
        settings.parallel,
        settings.precision,
        settings.kernels,
        settings.recompute,
        calculate_per_token_loss=settings.batch.calculate_per_token_loss,
        barrier_with_L1_time=settings.logging.barrier_with_L1_time,
    )
    config.perform_initialization = False  # every weight is loaded
    return build_model(
        settings.model,
        settings.kernels,
        config,
        document_attention=settings.data.reset_attention_mask,
        pre_process=True,
        post_process=True,
    )


def _load_strict(model: TSTGPTModel, state: dict) -> None:
    """``load_state_dict`` that tolerates only missing ``_extra_state`` entries."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # torch lists every size mismatch, one per line
        mismatches = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
        raise ConversionError(
            "the weights do not fit the model their settings describe (a config.json or "
            f"model flags that are not the weights'): {(mismatches or [str(err)])[0]}{more}"
        ) from None
    missing = [key for key in result.missing_keys if not key.endswith("._extra_state")]
    if missing or result.unexpected_keys:
        raise ConversionError(
            f"weights do not fit the model: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}"
        )
