"""Every difference between the Megatron-Core releases we support, in one place.

Supported: 0.19.x (Python >= 3.12, the primary environment) and 0.16.1 (Python 3.10/3.11).
No other module of tst_megatron asks which Megatron-Core is installed; each difference below
names the release that introduced it and is tested in ``tests/test_mcore_compat.py``.
Fixes to Megatron-Core bugs live in `tst_megatron.mcore_fixes`, CPU-only patches in
`tst_megatron.cpu.shim`.

Differences (0.16.1 -> 0.17+ unless said otherwise):

* Checkpoint common state (`RANK0_CHECKPOINT_FILES`, `rank0_checkpoint_writers`): 0.16 writes
  the non-tensor state to ``common.pt`` (``strategies/common.py``,
  ``TorchCommonSaveStrategy.save_common``); 0.17 removed that class (a deprecated
  ``save_common`` function is left) and 0.19 stores the common state as a ``common_state``
  object inside the torch_dist shards, writing no ``common.pt``. 0.19 still reads
  ``common.pt``, so a 0.16.1 checkpoint loads; 0.16.1 cannot read a 0.19 checkpoint
  (`check_checkpoint_readable`).
* Async saves (`async_save_kwargs`): ``dist_checkpointing.save(..., async_sharded_save=True)``
  defaults to ``async_strategy="nvrx"`` (nvidia-resiliency-ext's writer); we always use
  Megatron-Core's own writer and queue (``"mcore"``, the only one 0.16.1 has).
* Context-parallel slicing (`batch_on_this_cp_rank`): 0.18 adds a required ``is_hybrid_cp``
  to ``utils.get_batch_on_this_cp_rank`` and its ``cp_group=None`` means the WORLD group (0.16:
  the context-parallel group of ``parallel_state``). We pass the group explicitly everywhere.
* Layer specs (`spec_module`, `build_mlp`): 0.18 returns the ``submodules.mlp`` of a layer spec as a
  ``functools.partial`` of ``MoELayer`` (or of ``MLP.as_mlp_submodule``), 0.16 as a
  ``ModuleSpec``.
* Fixed upstream (`TE_GEMM_UNBOUND_WITHOUT_TE`): 0.16.1's ``transformer/moe/moe_utils.py``
  leaves ``te_general_gemm`` unbound when Transformer Engine is absent (every MoE forward
  raises ``NameError``); 0.19 binds it to None. `mcore_fixes` binds it where it is missing,
  a no-op on 0.19.

Not a code difference: 0.18+ imports triton at start-up where it is installed
(``inference/communication/torch_symm_triton``, through the MoE dispatcher and tensor-parallel
layers); PyPI's torch 2.14.1 brings it. Nothing here adapts to it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from megatron.core import package_info

__all__ = [
    "MCORE_RELEASE",
    "MCORE_VERSION",
    "RANK0_CHECKPOINT_FILES",
    "SUPPORTED_RELEASES",
    "TE_GEMM_UNBOUND_WITHOUT_TE",
    "async_save_kwargs",
    "batch_on_this_cp_rank",
    "build_mlp",
    "check_checkpoint_readable",
    "check_supported",
    "rank0_checkpoint_writers",
    "release_of",
    "spec_module",
]

MCORE_VERSION: str = package_info.__version__
# The (major, minor) releases whose code paths the test suite runs.
SUPPORTED_RELEASES: tuple[tuple[int, int], ...] = ((0, 16), (0, 19))


def release_of(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a Megatron-Core version string such as ``"0.19.2"`` or
    ``"0.16.1rc0"``.

    Raises:
        ValueError: naming the string, when it does not start with two numbers.
    """
    parts = version.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or "x")
    except (IndexError, ValueError):
        raise ValueError(f"{version!r} is not a Megatron-Core version (e.g. 0.19.2)") from None


MCORE_RELEASE: tuple[int, int] = release_of(MCORE_VERSION)
_COMMON_STATE_IN_SHARDS = MCORE_RELEASE >= (0, 19)  # no common.pt (TorchCommonSaveStrategy: 0.16)
_NVRX_ASYNC_DEFAULT = MCORE_RELEASE >= (0, 17)  # save(async_strategy="nvrx") by default
_CP_SLICE_NEEDS_GROUP = MCORE_RELEASE >= (0, 18)  # is_hybrid_cp required, None = WORLD
# Without Transformer Engine, moe_utils.te_general_gemm is unbound (a NameError in the router).
TE_GEMM_UNBOUND_WITHOUT_TE: bool = MCORE_RELEASE < (0, 19)


def _release_name(release: tuple[int, int]) -> str:
    return f"{release[0]}.{release[1]}"


def check_supported(release: tuple[int, int] = MCORE_RELEASE, what: str = "") -> None:
    """Refuse a Megatron-Core release the code paths here were not written and tested for.

    Raises:
        RuntimeError: naming the installed version and the supported releases.
    """
    if release not in SUPPORTED_RELEASES:
        names = " and ".join(f"{_release_name(r)}.x" for r in SUPPORTED_RELEASES)
        raise RuntimeError(
            f"{what or 'tst_megatron'} supports megatron-core {names}, found {MCORE_VERSION}: "
            "install megatron-core>=0.19.2,<0.20 (Python >= 3.12) or megatron-core~=0.16.1"
        )


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

# Files of a torch_dist checkpoint that rank 0 writes alone (after the shards); a checkpoint
# record without them is incomplete. 0.16 adds common.pt.
RANK0_CHECKPOINT_FILES: tuple[str, ...] = (
    (".metadata", "metadata.json") if _COMMON_STATE_IN_SHARDS
    else (".metadata", "common.pt", "metadata.json")
)


def rank0_checkpoint_writers() -> list[tuple[Any, str]]:
    """``(owner, attribute)`` of each Megatron-Core function that writes one of
    `RANK0_CHECKPOINT_FILES` on rank 0 alone, each followed by a collective.

    ``.metadata``: ``FileSystemWriterAsync.finish`` (``strategies/filesystem_async.py``);
    ``metadata.json``: ``serialization.save_config``; 0.16 only, ``common.pt``:
    ``TorchCommonSaveStrategy.save_common`` (``strategies/common.py``).
    """
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync,
    )

    writers: list[tuple[Any, str]] = [(FileSystemWriterAsync, "finish")]
    if not _COMMON_STATE_IN_SHARDS:
        from megatron.core.dist_checkpointing.strategies.common import TorchCommonSaveStrategy

        writers.append((TorchCommonSaveStrategy, "save_common"))
    writers.append((serialization, "save_config"))
    return writers


def async_save_kwargs() -> dict[str, str]:
    """Extra keywords of ``dist_checkpointing.save`` that select Megatron-Core's own async
    writer (0.17+ defaults to nvidia-resiliency-ext's, which we neither install nor patch)."""
    return {"async_strategy": "mcore"} if _NVRX_ASYNC_DEFAULT else {}


def check_checkpoint_readable(saved_version: str | None, path: str) -> None:
    """Refuse, before any shard is read, a checkpoint this Megatron-Core cannot load.

    ``saved_version`` is the Megatron-Core version recorded in the checkpoint's
    ``tst_checkpoint.json``; ``None`` (a record written before versions were recorded) means
    0.16.1. A 0.16.1 checkpoint loads under 0.19 (its ``common.pt`` is read); a 0.19
    checkpoint keeps its common state inside the shards, which 0.16.1 cannot read.

    Raises:
        ValueError: one line naming the checkpoint, both versions and what to do.
    """
    saved = saved_version or "0.16.1"
    if release_of(saved) >= (0, 19) and not _COMMON_STATE_IN_SHARDS:
        raise ValueError(
            f"checkpoint {path} was written by megatron-core {saved}, which this "
            f"megatron-core {MCORE_VERSION} cannot read (0.19 keeps the common state inside "
            "the shards, 0.16 reads common.pt): resume it with megatron-core >= 0.19 "
            "(Python >= 3.12, see README)"
        )


# --------------------------------------------------------------------------------------------
# Context parallelism
# --------------------------------------------------------------------------------------------


def batch_on_this_cp_rank(
    batch: dict[str, Any], cp_group: torch.distributed.ProcessGroup
) -> dict[str, Any]:
    """This context-parallel rank's share of ``batch`` (Megatron-Core's load-balanced 2*CP
    chunks of ``utils.get_batch_on_this_cp_rank``), over the given group on every release.

    Tensors ``[b, S, ...]`` become ``[b, S / CP, ...]`` (``attention_mask``
    ``[b, 1, S, S]`` -> ``[b, 1, S / CP, S]``).
    """
    from megatron.core.utils import get_batch_on_this_cp_rank

    if _CP_SLICE_NEEDS_GROUP:
        return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=cp_group)
    return get_batch_on_this_cp_rank(batch, cp_group=cp_group)


# --------------------------------------------------------------------------------------------
# Layer specs
# --------------------------------------------------------------------------------------------


def build_mlp(spec: Any, config: Any) -> torch.nn.Module:
    """Build a layer spec's ``submodules.mlp`` alone, as ``TransformerLayer`` does: 0.18+ calls
    the ``functools.partial`` with the config and ``parallel_state``'s process groups, 0.16
    passes the ``ModuleSpec`` to ``build_module``."""
    if isinstance(spec, functools.partial):
        from megatron.core.process_groups_config import ProcessGroupCollection

        groups = ProcessGroupCollection.use_mpu_process_groups()
        return spec(config=config, pg_collection=groups, is_mtp_layer=False)
    from megatron.core.transformer.spec_utils import build_module

    return build_module(spec, config=config)


def spec_module(spec: Any) -> Callable | type:
    """The module class a layer spec's entry builds (``MoELayer``, ``MLP``, ...).

    ``spec`` is a ``ModuleSpec`` or a class (0.16), or (0.18+) a ``functools.partial`` of the
    class or of its ``as_mlp_submodule`` builder (MoE and dense ``submodules.mlp``).
    """
    if isinstance(spec, functools.partial):
        spec = spec.func
    spec = getattr(spec, "module", spec)
    owner = getattr(spec, "__self__", None)  # a bound classmethod builder
    return owner if isinstance(owner, type) else spec
