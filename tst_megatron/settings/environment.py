"""The machine a configuration is resolved for: CUDA, its device, Transformer Engine, kernels.

Settings that depend on the machine (the layer implementation, the fusions, the MoE kernels,
the process-group backend, the MFU denominator) are resolved against an `Environment` that is
passed in, never asked of the running process on the way: `Environment.detect` describes this
process, `Environment.gpu` a GPU node of the shipped image (Transformer Engine, apex), so a
GPU layout resolves the same on a laptop as on the cluster.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch

from tst_megatron.kernels import KernelAvailability

TransformerImpl = Literal["local", "transformer_engine"]
Backend = Literal["nccl", "gloo"]
# Dense (non-sparse) BF16 tensor-core peak TFLOP/s per GPU, from NVIDIA's data sheets. Matched
# as lowercase substrings of `torch.cuda.get_device_name()` in this order (specific first:
# "gb200" contains "b200", "gh200" and "h200 nvl" contain "h200").
PEAK_TFLOPS_BF16: dict[str, float] = {
    "gb200": 2500.0,
    "b200": 2250.0,  # HGX B200
    "gh200": 989.0,  # Grace Hopper: an H100-class GPU
    "h200 nvl": 835.0,
    "h200": 989.0,  # SXM
    "h100 pcie": 756.0,
    "h100 nvl": 835.0,
    "h100": 989.0,  # SXM
    "a100": 312.0,
}
# Dense FP8 over dense BF16 tensor-core peak on Hopper and Blackwell (for time estimates only:
# MFU is reported against the BF16 peak, see `current_device_peak_tflops`).
FP8_SPEEDUP = 2.0
# CUDA compute capability by GPU family (same matching as `PEAK_TFLOPS_BF16`).
CAPABILITY: dict[str, tuple[int, int]] = {
    "gb200": (10, 0),
    "b200": (10, 0),
    "gh200": (9, 0),
    "h200": (9, 0),
    "h100": (9, 0),
    "a100": (8, 0),
}
# Transformer Engine >= 2.1's permutation kernels, as Megatron-Core's moe_utils imports them.
FUSED_PERMUTE_KERNELS = (
    "fused_permute",
    "fused_permute_with_probs",
    "fused_sort_chunks_by_index",
    "fused_sort_chunks_by_index_with_probs",
    "fused_unpermute",
)


def _lookup(table: dict, name: str):
    lowered = name.lower()
    return next((value for key, value in table.items() if key in lowered), None)


def peak_tflops_for_device(name: str, fp8: bool = False) -> float | None:
    """Per-GPU dense peak TFLOP/s for a device name (None when the GPU is not in the table).

    ``fp8``: the FP8 tensor-core peak instead of BF16, for time estimates (the planner).
    """
    tflops = _lookup(PEAK_TFLOPS_BF16, name)
    return None if tflops is None else tflops * (FP8_SPEEDUP if fp8 else 1.0)


def current_device_peak_tflops() -> float | None:
    """The MFU denominator of this process's CUDA device: its dense BF16 peak TFLOP/s.

    Also under FP8, as is conventional: attention, the LM head and the loss still run in
    BF16, and one denominator keeps MFU comparable across precisions. None on CPU or an
    unknown GPU (give ``--peak-tflops``).
    """
    if not torch.cuda.is_available():
        return None
    return peak_tflops_for_device(torch.cuda.get_device_name())


def fused_permute_importable() -> bool:
    """Whether Megatron-Core found Transformer Engine's fused permutation kernels."""
    from megatron.core.transformer.moe import moe_utils

    return all(getattr(moe_utils, name, None) is not None for name in FUSED_PERMUTE_KERNELS)


@dataclass(frozen=True, kw_only=True, slots=True)
class Environment:
    """What a run's settings are resolved against.

    ``kernels``: CUDA, Transformer Engine and apex's fused kernels. ``device_name`` and
    ``capability``: the CUDA device (None without one). ``fused_permute``: Transformer
    Engine's MoE permutation kernels. ``grouped_gemm``: the ``grouped_gemm`` package (the
    local spec's grouped experts). ``peak_tflops``: the device's dense BF16 peak (MFU).
    """

    kernels: KernelAvailability
    device_name: str | None = None
    capability: tuple[int, int] | None = None
    fused_permute: bool = False
    grouped_gemm: bool = False
    peak_tflops: float | None = None

    @property
    def cuda(self) -> bool:
        return self.kernels.cuda

    @property
    def transformer_engine(self) -> bool:
        return self.kernels.transformer_engine

    @property
    def default_transformer_impl(self) -> TransformerImpl:
        """``--transformer-impl`` when not given: Transformer Engine on a GPU that has it."""
        return "transformer_engine" if self.cuda and self.transformer_engine else "local"

    @property
    def default_backend(self) -> Backend:
        """``--distributed-backend`` when not given: nccl with CUDA, gloo without."""
        return "nccl" if self.cuda else "gloo"

    @classmethod
    def detect(cls) -> Environment:
        """This process: its CUDA device and the packages it can import."""
        kernels = KernelAvailability.detect()
        cuda = kernels.cuda
        return cls(
            kernels=kernels,
            device_name=torch.cuda.get_device_name() if cuda else None,
            capability=torch.cuda.get_device_capability() if cuda else None,
            fused_permute=cuda and kernels.transformer_engine and fused_permute_importable(),
            grouped_gemm=importlib.util.find_spec("grouped_gemm") is not None,
            peak_tflops=current_device_peak_tflops(),
        )

    @classmethod
    def cpu(cls) -> Environment:
        """A host without CUDA and without the optional kernels (the CPU test machines)."""
        return cls(kernels=KernelAvailability(cuda=False))

    @classmethod
    def gpu(cls, name: str) -> Environment:
        """A GPU node of the shipped image (NGC PyTorch: Transformer Engine >= 2.1, apex).

        ``name`` is a GPU model as `tools/plan.py --gpu` takes it (``h100``, ``b200``, ...).

        Raises:
            ValueError: a GPU model without a known peak and compute capability.
        """
        peak, capability = _lookup(PEAK_TFLOPS_BF16, name), _lookup(CAPABILITY, name)
        if peak is None or capability is None:
            known = ", ".join(sorted(CAPABILITY))
            raise ValueError(f"unknown GPU model {name!r}; known: {known}")
        return cls(
            kernels=KernelAvailability(
                cuda=True,
                transformer_engine=True,
                apex_layer_norm=True,
                apex_persistent_layer_norm=True,
                masked_softmax=True,
                fused_wgrad=True,
            ),
            device_name=name,
            capability=capability,
            fused_permute=True,
            peak_tflops=peak,
        )
