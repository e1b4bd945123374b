"""Device-independent fixes to Megatron-Core 0.16.1, in one place.

Each fix names the mcore file and why; each applies on GPUs and CPUs alike (the CPU-only
patches live in `tst_megatron.cpu.shim`). `apply_mcore_fixes` is idempotent and is called by
the model builder before any model is built. The torch-AdamW fallback fixes are per optimizer
instance and live in `tst_megatron.training.optimizer`.
"""

from __future__ import annotations

__all__ = ["apply_mcore_fixes"]


def apply_mcore_fixes() -> None:
    """Apply every fix below (idempotent)."""
    _bind_missing_te_general_gemm()


def _bind_missing_te_general_gemm() -> None:
    """transformer/moe/moe_utils.py: ``RouterGatingLinearFunction.forward`` tests
    ``te_general_gemm is not None``, but the name is bound only when Transformer Engine
    imports (it is imported inside ``try: ... except ImportError``). Without TE every MoE
    forward raises ``NameError: name 'te_general_gemm' is not defined``, on any device.
    Binding it to None selects mcore's own ``torch.mm`` branch, as the test intends.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
