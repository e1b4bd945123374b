"""Which optional fused kernels this process can use (CUDA, Transformer Engine, apex).

Megatron-Core imports them opportunistically and fails at the first forward (or at build)
when a fusion flag asks for one that is missing. `KernelAvailability.detect` answers up front,
without importing the packages (``importlib.util.find_spec``), so the builder can resolve each
fusion before any work (`tst_megatron.training.fusions`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing or half-installed
        return False


def transformer_engine_importable() -> bool:
    """Whether this process can import Transformer Engine (checked without importing it)."""
    return _importable("transformer_engine")


@dataclass(frozen=True)
class KernelAvailability:
    """Optional kernels present in this process.

    - ``transformer_engine``: TE (its attention, norms, fused RoPE, fused CE).
    - ``apex_layer_norm`` / ``apex_persistent_layer_norm``: apex's fused and persistent
      LayerNorm kernels (mcore's ``FusedLayerNorm``).
    - ``masked_softmax``: apex's ``scaled_upper_triang_masked_softmax_cuda`` and
      ``scaled_masked_softmax_cuda`` (mcore's ``FusedScaleMaskSoftmax``).
    - ``fused_wgrad``: apex's ``fused_weight_gradient_mlp_cuda`` (gradient-accumulation
      fusion in mcore's tensor-parallel linears).
    """

    cuda: bool
    transformer_engine: bool = False
    apex_layer_norm: bool = False
    apex_persistent_layer_norm: bool = False
    masked_softmax: bool = False
    fused_wgrad: bool = False

    @classmethod
    def detect(cls) -> KernelAvailability:
        cuda = torch.cuda.is_available()
        return cls(
            cuda=cuda,
            transformer_engine=transformer_engine_importable(),
            apex_layer_norm=cuda and _importable("apex.normalization.fused_layer_norm"),
            apex_persistent_layer_norm=cuda and _importable("apex.contrib.layer_norm"),
            masked_softmax=cuda
            and _importable("scaled_upper_triang_masked_softmax_cuda")
            and _importable("scaled_masked_softmax_cuda"),
            fused_wgrad=cuda and _importable("fused_weight_gradient_mlp_cuda"),
        )
