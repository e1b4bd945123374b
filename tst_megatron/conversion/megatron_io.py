"""Megatron side of a conversion: loading any saved layout in one process, saving.

A `torch_dist` checkpoint written at any TP/PP/EP (and virtual pipeline) layout loads into the
whole model built at TP=PP=EP=1 in a single process: `dist_checkpointing` reshards by the
global keys of the sharded tensors. The model is built with the local (non-TE) spec, whose
sharded keys match the TE spec's, and with per-expert MLPs, whose sharded keys match grouped
GEMM's, so checkpoints of either implementation load. Nothing here needs a GPU or a launcher;
the weights stay in host memory.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from tst_megatron.conversion import ConversionError
from tst_megatron.model import TSTGPTModel
from tst_megatron.settings import ModelConfig, RunConfig
from tst_megatron.training import checkpointing as ckpt
from tst_megatron.training.checkpoint_settings import CheckpointedRun
from tst_megatron.training.loop import run_transformer_config, whole_model
from tst_megatron.training.model_builder import single_process_parallel_state


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


def load_model(run: RunConfig, path: str) -> TSTGPTModel:
    """The whole model of checkpoint ``path``, in one process (TP=PP=1 parallel state active).

    Only the weights are read (not the optimizer); ``_extra_state`` entries are skipped.
    The files are first checked against the sizes and CRC32s ``tst_checkpoint.json`` records.
    """
    try:
        ckpt.verify_files(path, ckpt.recorded_files(ckpt.read_checkpoint_meta(path), path))
    except ckpt.CheckpointError as err:
        raise ConversionError(str(err)) from None
    model = _build(run)
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


def save_model_checkpoint(run: RunConfig, state: dict[str, torch.Tensor], save: str) -> str | None:
    """Write Megatron ``state`` as ``save/iter_0000000`` (phase 2) with tracker and metadata.

    ``pretrain_tst.py --load save --finetune`` (any layout) continues from it. Without CUDA
    this installs the CPU shim (`dist_checkpointing.save` synchronises CUDA), as
    ``pretrain_tst.py`` does.
    """
    if not torch.cuda.is_available():
        from tst_megatron.cpu.shim import install_cpu_shim

        install_cpu_shim()
    checkpoints = ckpt.Checkpointer(dataclasses.replace(run.checkpoint, save=save))
    with single_process_parallel_state():
        model = _build(run)
        _load_strict(model, state)
        return checkpoints.save(
            CheckpointedRun.of(run), [model], None, None, ckpt.TrainingProgress(0, 0, 2, {})
        )


def _build(settings: RunConfig) -> TSTGPTModel:
    """The whole model of ``settings`` (`tool_flags.single_process_settings`), uninitialised."""
    config = run_transformer_config(settings)
    config.perform_initialization = False  # every weight is loaded
    return whole_model(settings, config)


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
